//! The per-VM supervisor process (started by the smolvm library; not for
//! direct use).

fn main() {
    smolvm::supervisor_main()
}
