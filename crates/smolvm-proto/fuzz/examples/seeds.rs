//! Writes the seed corpus: `cargo run --example seeds [DIR]` (default
//! `corpus`), one file per seed under `DIR/<target>/`. The kept corpus is
//! these seeds plus what the fuzzer found, minimised with `cargo fuzz cmin`.

fn main() -> std::io::Result<()> {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "corpus".into());
    let seeds = smolvm_proto_fuzz::seeds();
    for (target, name, bytes) in &seeds {
        let d = std::path::Path::new(&dir).join(target);
        std::fs::create_dir_all(&d)?;
        std::fs::write(d.join(name), bytes)?;
    }
    println!("{} seeds written under {dir}/", seeds.len());
    Ok(())
}
