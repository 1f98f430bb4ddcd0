//! Which lifecycle operation is legal in which state, in one table: every
//! operation asks [`plan`] instead of re-checking states itself. Pure, and
//! unit-tested cell by cell.

use super::record::invalid;
use crate::error::Error;
use crate::state::VmState;

/// A lifecycle operation on one VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Start,
    Stop,
    Pause,
    Resume,
    /// Run a command (also ping, and anything else that needs the agent).
    Exec,
    Delete,
}

/// What the operation does in the VM's current state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Boot the VM (created or stopped).
    Boot,
    /// Do what was asked (stop, pause, resume, exec, delete).
    Proceed,
    /// `start` of a paused VM resumes it.
    Resume,
    /// Already where the operation leads: nothing to do.
    Nothing,
}

/// The action for `op` on VM `id` in `state`, or the error to return (it
/// names the state and says what to run instead). `last_error` is the
/// reason recorded for a VM in `error`.
pub fn plan(op: Op, id: &str, state: VmState, last_error: Option<&str>) -> Result<Action, Error> {
    use Action::*;
    use VmState::*;
    let broken = || {
        format!(
            "{}; remove it with `smolvm rm {id}`",
            last_error.unwrap_or("its VMM failed")
        )
    };
    let refuse = |hint: String| Err(invalid(id, state, hint));
    match (op, state) {
        (Op::Delete, _) => Ok(Proceed),

        (Op::Start, Created | Stopped) => Ok(Boot),
        (Op::Start, Running) => Ok(Nothing),
        (Op::Start, Paused) => Ok(Resume),
        (Op::Start, Error) => refuse(broken()),

        (Op::Stop, Running | Paused) => Ok(Proceed),
        // Nothing runs (an interrupted start is cleaned up by the caller).
        (Op::Stop, Created | Stopped | Error) => Ok(Nothing),

        (Op::Pause, Running) => Ok(Proceed),
        (Op::Pause, Paused) => refuse(format!(
            "it is already paused; `smolvm resume {id}` continues it"
        )),
        (Op::Resume, Paused) => Ok(Proceed),
        (Op::Resume, Running) => refuse(format!(
            "it is not paused (nothing to resume); `smolvm pause {id}` pauses it"
        )),
        (Op::Exec, Running) => Ok(Proceed),

        (Op::Pause | Op::Resume | Op::Exec, Error) => refuse(broken()),
        (Op::Pause | Op::Resume | Op::Exec, Created | Stopped) => {
            refuse(format!("run `smolvm start {id}` first"))
        }
        (Op::Exec, Paused) => refuse(format!("run `smolvm resume {id}` first")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    const STATES: [VmState; 5] = [
        VmState::Created,
        VmState::Running,
        VmState::Paused,
        VmState::Stopped,
        VmState::Error,
    ];

    fn cell(op: Op, s: VmState) -> Result<Action, String> {
        plan(op, "v", s, Some("VMM exited with signal 9")).map_err(|e| {
            assert_eq!(e.kind(), ErrorKind::InvalidState);
            e.to_string()
        })
    }

    #[test]
    fn every_cell() {
        use Action::*;
        use VmState::*;
        let table: [(Op, [Result<Action, &str>; 5]); 6] = [
            // created, running, paused, stopped, error
            (
                Op::Start,
                [
                    Ok(Boot),
                    Ok(Nothing),
                    Ok(Resume),
                    Ok(Boot),
                    Err("smolvm rm v"),
                ],
            ),
            (
                Op::Stop,
                [
                    Ok(Nothing),
                    Ok(Proceed),
                    Ok(Proceed),
                    Ok(Nothing),
                    Ok(Nothing),
                ],
            ),
            (
                Op::Pause,
                [
                    Err("smolvm start v"),
                    Ok(Proceed),
                    Err("already paused"),
                    Err("smolvm start v"),
                    Err("smolvm rm v"),
                ],
            ),
            (
                Op::Resume,
                [
                    Err("smolvm start v"),
                    Err("not paused"),
                    Ok(Proceed),
                    Err("smolvm start v"),
                    Err("smolvm rm v"),
                ],
            ),
            (
                Op::Exec,
                [
                    Err("smolvm start v"),
                    Ok(Proceed),
                    Err("smolvm resume v"),
                    Err("smolvm start v"),
                    Err("smolvm rm v"),
                ],
            ),
            (Op::Delete, [Ok(Proceed); 5]),
        ];
        for (op, row) in table {
            for (s, want) in STATES.iter().zip(row) {
                let got = cell(op, *s);
                match (want, &got) {
                    (Ok(a), Ok(b)) => assert_eq!(a, *b, "{op:?} in {s}"),
                    (Err(hint), Err(msg)) => {
                        assert!(msg.contains(hint), "{op:?} in {s}: {msg}");
                        assert!(msg.contains(&format!("is {s}")), "names the state: {msg}");
                    }
                    _ => panic!("{op:?} in {s}: expected {want:?}, got {got:?}"),
                }
            }
        }
        assert!(cell(Op::Exec, Error).unwrap_err().contains("signal 9"));
        assert_eq!(cell(Op::Start, Created), Ok(Boot));
        assert_eq!(cell(Op::Stop, Stopped), Ok(Nothing));
        let _ = (Running, Paused);
    }
}
