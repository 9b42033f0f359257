//! Waiting until the programs' hand-over up to now has reached the buffer, as a drain ends and
//! a recording is taken: an RCU grace period from the start (every program run that began
//! before it has ended), then what each CPU had handed over by then (the fence), then until
//! every frame before the fence has come (or the audit found it lost).

use enforcer_common::HoldSeq;

/// What the wait reads in the datapath.
pub(crate) trait Fence {
    /// What each CPU's programs have handed to the hold path for `queue`, by CPU (`None`:
    /// unreadable).
    fn handed(&mut self, queue: u32) -> Option<Vec<HoldSeq>>;
    /// Starts an RCU grace period (or joins one starting); returns its token.
    fn grace_start(&mut self) -> u64;
    /// Whether grace period `token` has passed: every program run that began before it
    /// started has ended.
    fn grace_passed(&mut self, token: u64) -> bool;
}

/// Where a wait stands.
#[derive(Clone, Debug)]
pub(crate) enum FenceWait {
    /// Just begun: a grace period is to begin.
    Start,
    /// Waiting out the grace period that began then.
    Grace { token: u64 },
    /// What each CPU had handed over once the grace period passed, by queue.
    Fenced { fence: Vec<(u32, Vec<HoldSeq>)> },
}

impl FenceWait {
    /// Moves the wait for `queues` as far as it goes; true once every frame before its fence
    /// has come. `next(queue, cpu)`: the next ticket the buffer expects from that CPU.
    pub(crate) fn passed(
        &mut self,
        fence: &mut impl Fence,
        queues: &[u32],
        next: impl Fn(u32, u32) -> u64,
    ) -> bool {
        loop {
            match self {
                FenceWait::Start => {
                    *self = FenceWait::Grace {
                        token: fence.grace_start(),
                    };
                }
                FenceWait::Grace { token } => {
                    if !fence.grace_passed(*token) {
                        return false;
                    }
                    let handed: Option<Vec<(u32, Vec<HoldSeq>)>> = queues
                        .iter()
                        .map(|q| Some((*q, fence.handed(*q)?)))
                        .collect();
                    let Some(handed) = handed else {
                        return false;
                    };
                    *self = FenceWait::Fenced { fence: handed };
                }
                FenceWait::Fenced { fence } => {
                    return fence.iter().all(|(q, cpus)| {
                        cpus.iter()
                            .enumerate()
                            .all(|(cpu, seq)| next(*q, cpu as u32) >= seq.all)
                    });
                }
            }
        }
    }
}
