//! Which reconciles go first, and in what order.
//!
//! kube-runtime bounds the reconciles it runs at once itself, but once every slot is busy it keeps
//! the nodes that came due in a hash set and starts them in the set's order, not in the order they
//! came due: a node whose hash sits early in the set is taken each time it comes back, one late in
//! it waits. In a burst of 100 notices, records looking again every poll interval were taken over
//! and over while the last 30 new notices waited in that set 20 s to 2.5 min for their first
//! reconcile (one more scale-up call per wave of them). So the runtime starts every reconcile at
//! once, and each waits here for a seat, first come first served (tokio's semaphore is fair), in
//! one of two lanes:
//!
//! - **urgent**: what the state machine's timing promises depend on: a notice with no record yet
//!   (its scale-up call waits for it), an interruption not tainted yet, a claimed replacement that
//!   just turned Ready (its old node's taint). The Node watch wakes the claimant of a replacement
//!   the moment it turns Ready; if the claimant is already waiting in the routine lane (its
//!   periodic look), it moves to the urgent one;
//! - **routine**: every other look: a record waiting for its instance or for Ready, a drain's next
//!   round, a retirement, a retry.
//!
//! Each lane has `--max-concurrent-reconciles` seats, so a burst's first steps never wait for the
//! waiting records' looks, and the API connections stay bounded (each reconcile at work holds one).
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use prometheus::IntGaugeVec;
use tokio::sync::{Notify, Semaphore, SemaphorePermit};

use super::record::Phase;

/// Seats of the urgent lane per seat of the routine lane. Measured on the bench (100 notices at
/// once, 5,000 Nodes): 4 per routine seat made 2 scale-up calls but held up to 100 API connections
/// and 83-119 MiB at the peak; 1 made 3-4 calls at 72-77 MiB.
pub const URGENT_SEATS_PER_ROUTINE: usize = 1;

/// The lane a reconcile waits in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    Urgent,
    Routine,
}

impl Lane {
    pub fn label(self) -> &'static str {
        match self {
            Lane::Urgent => "urgent",
            Lane::Routine => "routine",
        }
    }
}

/// What a reconcile's lane is chosen from: the node as the cache shows it and its record.
#[derive(Debug, Clone, Copy, Default)]
pub struct Arrival {
    /// A valid notice (rebalance or interruption) is on the node.
    pub noticed: bool,
    /// A valid interruption notice is on the node.
    pub interrupted: bool,
    /// The node carries the termination taint.
    pub tainted: bool,
    /// The node names another instance than its provider id (nothing is done for it).
    pub lying: bool,
    /// The phase of the node's record, if it has one.
    pub phase: Option<Phase>,
}

/// The lane of a reconcile (pure).
pub fn lane_of(arrival: &Arrival) -> Lane {
    let urgent = !arrival.lying
        && ((arrival.interrupted && !arrival.tainted) || (arrival.noticed && arrival.phase.is_none()));
    if urgent { Lane::Urgent } else { Lane::Routine }
}

/// The two lanes' seats, and the nodes the watch woke because their replacement turned Ready.
pub struct Lanes {
    urgent: Semaphore,
    routine: Semaphore,
    /// Per node woken for a Ready replacement: a signal that moves its reconcile to the urgent lane
    /// (kept until that reconcile enters, if none waits yet).
    promotions: Mutex<HashMap<String, Arc<Notify>>>,
    waiting: IntGaugeVec,
}

impl Lanes {
    /// Lanes with `routine` seats for routine looks (at least one).
    pub fn new(routine: usize, waiting: IntGaugeVec) -> Self {
        let routine = routine.max(1);
        Lanes {
            urgent: Semaphore::new(routine * URGENT_SEATS_PER_ROUTINE),
            routine: Semaphore::new(routine),
            promotions: Mutex::default(),
            waiting,
        }
    }

    /// Waits for a seat for `node`'s reconcile in `lane`, in order of arrival; a routine look of a
    /// node woken for its Ready replacement (before or while it waits) takes an urgent seat
    /// instead. The seat is given back when the permit drops.
    pub async fn enter(&self, node: &str, lane: Lane) -> SemaphorePermit<'_> {
        if lane == Lane::Urgent {
            // Urgent anyway: a wake waiting for this node has nothing left to move.
            super::context::lock(&self.promotions).remove(node);
            return self.take(Lane::Urgent).await;
        }
        let promotion = self.promotion_of(node);
        let seat = tokio::select! {
            biased;
            () = promotion.notified() => self.take(Lane::Urgent).await,
            seat = self.take(Lane::Routine) => seat,
        };
        let mut promotions = super::context::lock(&self.promotions);
        if promotions.get(node).is_some_and(|p| Arc::ptr_eq(p, &promotion)) {
            promotions.remove(node);
        }
        seat
    }

    async fn take(&self, lane: Lane) -> SemaphorePermit<'_> {
        let semaphore = match lane {
            Lane::Urgent => &self.urgent,
            Lane::Routine => &self.routine,
        };
        if let Ok(permit) = semaphore.try_acquire() {
            return permit;
        }
        let waiting = self.waiting.with_label_values(&[lane.label()]);
        waiting.inc();
        // Counted down also when the wait is given up for the other lane.
        let _counted = scopeguard(|| waiting.dec());
        // The semaphores are never closed.
        semaphore
            .acquire()
            .await
            .expect("the reconcile lanes are never closed")
    }

    fn promotion_of(&self, node: &str) -> Arc<Notify> {
        super::context::lock(&self.promotions)
            .entry(node.to_owned())
            .or_default()
            .clone()
    }

    /// `node` is woken because its claimed replacement turned Ready: its reconcile, waiting now or
    /// coming next, takes an urgent seat.
    pub fn woken_for_ready(&self, node: &str) {
        self.promotion_of(node).notify_one();
    }
}

/// Runs `f` when dropped.
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use prometheus::Opts;

    use super::*;

    fn arrival() -> Arrival {
        Arrival::default()
    }

    #[test]
    fn a_first_notice_and_an_untainted_interruption_are_urgent() {
        let first = Arrival {
            noticed: true,
            ..arrival()
        };
        assert_eq!(lane_of(&first), Lane::Urgent);
        let interrupted = Arrival {
            noticed: true,
            interrupted: true,
            phase: Some(Phase::ScalingSpot),
            ..arrival()
        };
        assert_eq!(lane_of(&interrupted), Lane::Urgent);
    }

    #[test]
    fn waiting_records_drains_lying_nodes_and_nodes_without_notice_are_routine() {
        for phase in [
            Phase::Detected,
            Phase::ScalingSpot,
            Phase::ScalingOnDemand,
            Phase::AwaitingReady,
            Phase::Tainted,
            Phase::Draining,
        ] {
            let waiting = Arrival {
                noticed: true,
                phase: Some(phase),
                ..arrival()
            };
            assert_eq!(lane_of(&waiting), Lane::Routine, "{phase:?}");
        }
        // An interruption already tainted has nothing urgent left.
        let done = Arrival {
            noticed: true,
            interrupted: true,
            tainted: true,
            phase: Some(Phase::Draining),
            ..arrival()
        };
        assert_eq!(lane_of(&done), Lane::Routine);
        // A node naming another instance gets a Warning and nothing else: it never jumps the queue.
        let lying = Arrival {
            noticed: true,
            interrupted: true,
            lying: true,
            ..arrival()
        };
        assert_eq!(lane_of(&lying), Lane::Routine);
        assert_eq!(lane_of(&arrival()), Lane::Routine);
    }

    fn waiting_gauge() -> IntGaugeVec {
        IntGaugeVec::new(Opts::new("waiting", "test"), &["lane"]).unwrap()
    }

    #[tokio::test]
    async fn seats_are_given_in_order_of_arrival_and_the_urgent_lane_does_not_wait_for_routine_looks() {
        let lanes = Arc::new(Lanes::new(1, waiting_gauge()));
        let held = lanes.enter("held", Lane::Routine).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut waiting = Vec::new();
        for i in 0..5 {
            let (lanes, order) = (lanes.clone(), order.clone());
            waiting.push(tokio::spawn(async move {
                let _seat = lanes.enter(&format!("node-{i}"), Lane::Routine).await;
                order.lock().unwrap().push(i);
            }));
            // Each arrives after the one before is queued.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(lanes.waiting.with_label_values(&["routine"]).get(), 5);
        // Every routine seat is taken, yet an urgent reconcile gets one at once.
        let urgent = tokio::time::timeout(Duration::from_secs(5), lanes.enter("new", Lane::Urgent)).await;
        assert!(urgent.is_ok(), "the urgent lane waited for the routine one");
        drop(held);
        for task in waiting {
            task.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3, 4]);
        assert_eq!(lanes.waiting.with_label_values(&["routine"]).get(), 0);
    }

    #[tokio::test]
    async fn a_look_woken_for_its_ready_replacement_leaves_the_routine_queue_for_an_urgent_seat() {
        let lanes = Arc::new(Lanes::new(1, waiting_gauge()));
        let _held = lanes.enter("held", Lane::Routine).await;
        // Woken while it waits behind the held seat.
        let waiter = {
            let lanes = lanes.clone();
            tokio::spawn(async move {
                let _seat = lanes.enter("claimant", Lane::Routine).await;
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "no routine seat is free");
        lanes.woken_for_ready("claimant");
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the woken look took an urgent seat")
            .unwrap();
        assert_eq!(lanes.waiting.with_label_values(&["routine"]).get(), 0);
        // Woken before it comes: its next look goes urgent at once, and only that one.
        lanes.woken_for_ready("claimant");
        let next = tokio::time::timeout(Duration::from_secs(5), lanes.enter("claimant", Lane::Routine)).await;
        assert!(next.is_ok(), "a wake before the look promotes it");
        drop(next);
        let after =
            tokio::time::timeout(Duration::from_millis(50), lanes.enter("claimant", Lane::Routine)).await;
        assert!(
            after.is_err(),
            "the wake was used once: the look after waits its turn"
        );
    }
}
