//! A linearizability checker (Wing & Gong's search with Lowe's memoization, as in Porcupine and
//! Knossos) for one object's history, and the model of one registry service. Linearizability is
//! local, so a history over several services is checked one service at a time.
//!
//! Written here because no maintained Rust crate checks histories with operations whose
//! outcome is unknown (a request that timed out may or may not have been applied); the tests
//! at the end feed it known-good and known-bad histories.

use std::collections::HashSet;
use std::hash::Hash;

/// A sequential specification.
pub trait Model: Clone + Eq + Hash {
    type Input: std::fmt::Debug;
    type Output: std::fmt::Debug;
    /// The state after `input` answered `output`, or None if this state cannot answer so.
    fn step(&self, input: &Self::Input, output: &Self::Output) -> Option<Self>;
    /// The state after `input` took effect with an answer nobody saw.
    fn step_unseen(&self, input: &Self::Input) -> Self;
}

/// One operation: invoked at `call`, answered at `ret` with `output`; `output: None` means the
/// outcome is unknown (it may have taken effect at any time after `call`, or never).
#[derive(Clone, Debug)]
pub struct Operation<M: Model> {
    pub call: u64,
    pub ret: u64,
    pub input: M::Input,
    pub output: Option<M::Output>,
}

/// Ok when some order of the operations, consistent with real time (an operation that returned
/// before another was called comes first), is a legal sequential history of `init`.
pub fn check<M: Model>(init: M, ops: Vec<Operation<M>>) -> Result<(), String> {
    check_at(init, ops).map_err(|(message, _)| message)
}

/// As [`check`], and on failure also the call time of the first operation no legal order
/// explains, so a caller can show what happened around it.
pub fn check_at<M: Model>(init: M, mut ops: Vec<Operation<M>>) -> Result<(), (String, u64)> {
    for op in &mut ops {
        if op.output.is_none() {
            op.ret = u64::MAX;
        }
    }
    ops.sort_by_key(|o| o.call);
    let n = ops.len();
    let words = n.div_ceil(64).max(1);
    let mut done = vec![0u64; words];
    let mut seen: HashSet<(Vec<u64>, M)> = HashSet::new();
    let mut longest = (0, done.clone());
    if search(&ops, &init, &mut done, 0, &mut seen, &mut longest) {
        return Ok(());
    }
    // Short enough to survive a CI log: the last operations the longest legal order explained
    // and the first ones it could not, by call time.
    let (count, explained) = longest;
    let show = |o: &Operation<M>| format!("{:?}->{:?}@[{},{}]", o.input, o.output, o.call, o.ret);
    let before: Vec<String> = ops
        .iter()
        .enumerate()
        .filter(|(i, _)| is_done(&explained, *i))
        .map(|(_, o)| show(o))
        .collect();
    let after: Vec<String> = ops
        .iter()
        .enumerate()
        .filter(|(i, _)| !is_done(&explained, *i))
        .take(12)
        .map(|(_, o)| show(o))
        .collect();
    let at = ops
        .iter()
        .enumerate()
        .find(|(i, o)| !is_done(&explained, *i) && o.output.is_some())
        .map_or(0, |(_, o)| o.call);
    Err((format!(
        "not linearizable: no order explains the history; the longest legal order covers {count} of {n} operations; its last ones: {:?}; the first ones it cannot explain: {after:?}",
        &before[before.len().saturating_sub(8)..]
    ), at))
}

fn is_done(done: &[u64], i: usize) -> bool {
    done[i / 64] & (1 << (i % 64)) != 0
}

fn flip(done: &mut [u64], i: usize) {
    done[i / 64] ^= 1 << (i % 64);
}

fn search<M: Model>(
    ops: &[Operation<M>],
    state: &M,
    done: &mut Vec<u64>,
    linearized: usize,
    seen: &mut HashSet<(Vec<u64>, M)>,
    longest: &mut (usize, Vec<u64>),
) -> bool {
    if linearized > longest.0 {
        *longest = (linearized, done.clone());
    }
    // The earliest answer still to be explained bounds what may go next.
    let mut min_ret = u64::MAX;
    let mut all_known_done = true;
    for (i, op) in ops.iter().enumerate() {
        if !is_done(done, i) && op.output.is_some() {
            all_known_done = false;
            min_ret = min_ret.min(op.ret);
        }
    }
    if all_known_done {
        // What is left had unknown outcomes: they may never have happened.
        return true;
    }
    for i in 0..ops.len() {
        let op = &ops[i];
        if op.call >= min_ret {
            break;
        }
        if is_done(done, i) {
            continue;
        }
        let next = match &op.output {
            Some(out) => state.step(&op.input, out),
            None => Some(state.step_unseen(&op.input)),
        };
        let Some(next) = next else { continue };
        flip(done, i);
        if seen.insert((done.clone(), next.clone()))
            && search(ops, &next, done, linearized + 1, seen, longest)
        {
            return true;
        }
        flip(done, i);
    }
    false
}

/// One registry service: absent, or present with its VIP (None: created by a request whose
/// answer was lost, so its VIP is not known yet).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Service {
    Absent,
    Present(Option<String>),
}

#[derive(Clone, Debug)]
pub enum Input {
    Register,
    Delete,
    Get,
}

#[derive(Clone, Debug)]
pub enum Output {
    /// A register's or get's VIP.
    Vip(String),
    /// A delete that found the service (true) or not (false).
    Deleted(bool),
    /// A get that found nothing.
    NotFound,
}

impl Model for Service {
    type Input = Input;
    type Output = Output;

    fn step(&self, input: &Input, output: &Output) -> Option<Self> {
        use Service::*;
        match (self, input, output) {
            // Registering creates the service with a new VIP, or keeps the one it has.
            (Absent, Input::Register, Output::Vip(v)) => Some(Present(Some(v.clone()))),
            (Present(None), Input::Register | Input::Get, Output::Vip(v)) => {
                Some(Present(Some(v.clone())))
            }
            (Present(Some(have)), Input::Register | Input::Get, Output::Vip(v)) => {
                (have == v).then(|| self.clone())
            }
            (Absent, Input::Delete, Output::Deleted(false)) => Some(Absent),
            (Present(_), Input::Delete, Output::Deleted(true)) => Some(Absent),
            (Absent, Input::Get, Output::NotFound) => Some(Absent),
            _ => None,
        }
    }

    fn step_unseen(&self, input: &Input) -> Self {
        match (self, input) {
            (Service::Absent, Input::Register) => Service::Present(None),
            (_, Input::Register) | (_, Input::Get) => self.clone(),
            (_, Input::Delete) => Service::Absent,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(call: u64, ret: u64, input: Input, output: Option<Output>) -> Operation<Service> {
        Operation {
            call,
            ret,
            input,
            output,
        }
    }

    fn vip(v: &str) -> Option<Output> {
        Some(Output::Vip(v.into()))
    }

    #[test]
    fn sequential_and_concurrent_good_histories_pass() {
        // register, get, delete, get: one after another.
        let h = vec![
            op(0, 1, Input::Register, vip("10.0.0.1")),
            op(2, 3, Input::Get, vip("10.0.0.1")),
            op(4, 5, Input::Delete, Some(Output::Deleted(true))),
            op(6, 7, Input::Get, Some(Output::NotFound)),
        ];
        check(Service::Absent, h).unwrap();
        // A get overlapping a register may see either side of it.
        let h = vec![
            op(0, 10, Input::Register, vip("10.0.0.1")),
            op(1, 2, Input::Get, Some(Output::NotFound)),
            op(3, 4, Input::Get, vip("10.0.0.1")),
        ];
        check(Service::Absent, h).unwrap();
        // A register whose answer was lost, seen by a later get.
        let h = vec![
            op(0, 1, Input::Register, None),
            op(5, 6, Input::Get, vip("10.0.0.7")),
        ];
        check(Service::Absent, h).unwrap();
        // ...or never applied.
        let h = vec![
            op(0, 1, Input::Register, None),
            op(5, 6, Input::Get, Some(Output::NotFound)),
        ];
        check(Service::Absent, h).unwrap();
    }

    #[test]
    fn known_bad_histories_fail() {
        // A stale read: the register returned before the get began, yet the get missed it.
        let h = vec![
            op(0, 1, Input::Register, vip("10.0.0.1")),
            op(2, 3, Input::Get, Some(Output::NotFound)),
        ];
        assert!(check(Service::Absent, h).is_err());
        // A lost acknowledged delete.
        let h = vec![
            op(0, 1, Input::Register, vip("10.0.0.1")),
            op(2, 3, Input::Delete, Some(Output::Deleted(true))),
            op(4, 5, Input::Get, vip("10.0.0.1")),
        ];
        assert!(check(Service::Absent, h).is_err());
        // A VIP that changed without a delete.
        let h = vec![
            op(0, 1, Input::Register, vip("10.0.0.1")),
            op(2, 3, Input::Register, vip("10.0.0.2")),
        ];
        assert!(check(Service::Absent, h).is_err());
        // Two deletes that both found the service, with no register between them.
        let h = vec![
            op(0, 1, Input::Register, vip("10.0.0.1")),
            op(2, 6, Input::Delete, Some(Output::Deleted(true))),
            op(3, 7, Input::Delete, Some(Output::Deleted(true))),
        ];
        assert!(check(Service::Absent, h).is_err());
        // Reads going back in time: seen, then not, then seen again, all sequential.
        let h = vec![
            op(0, 20, Input::Register, vip("10.0.0.1")),
            op(1, 2, Input::Get, vip("10.0.0.1")),
            op(3, 4, Input::Get, Some(Output::NotFound)),
        ];
        assert!(check(Service::Absent, h).is_err());
    }

    #[test]
    fn a_long_concurrent_history_is_checked_quickly() {
        // Four clients, 400 operations, overlapping in pairs: a real sequence, replayed with
        // widened intervals.
        let mut h = Vec::new();
        let mut state = Service::Absent;
        let mut vip_n = 0;
        for i in 0..400u64 {
            let input = match i % 5 {
                0 | 3 => Input::Register,
                1 => Input::Get,
                2 => Input::Delete,
                _ => Input::Get,
            };
            let output = match (&state, &input) {
                (Service::Absent, Input::Register) => {
                    vip_n += 1;
                    Output::Vip(format!("10.0.0.{vip_n}"))
                }
                (Service::Present(Some(v)), Input::Register | Input::Get) => Output::Vip(v.clone()),
                (Service::Absent, Input::Get) => Output::NotFound,
                (Service::Absent, Input::Delete) => Output::Deleted(false),
                (Service::Present(_), Input::Delete) => Output::Deleted(true),
                _ => unreachable!(),
            };
            state = state.step(&input, &output).unwrap();
            // Each op's interval covers its neighbours' linearization points.
            h.push(op(i * 10, i * 10 + 15, input, Some(output)));
        }
        let started = std::time::Instant::now();
        check(Service::Absent, h).unwrap();
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }
}
