//! The job queue between callers and a pool's database threads: a mutex-guarded deque and a
//! condition variable. A waiting thread sleeps on a futex until a job arrives — no spinning
//! and no `sched_yield` between jobs, which on a two-core virtual machine cost more CPU than
//! the jobs themselves at low rates.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

/// A multi-producer, multi-consumer FIFO queue that can be closed.
pub(crate) struct Queue<T> {
    state: Mutex<State<T>>,
    ready: Condvar,
}

struct State<T> {
    items: VecDeque<T>,
    closed: bool,
}

/// The queue was closed: the item comes back.
pub(crate) struct Closed<T>(pub T);

impl<T> Queue<T> {
    pub(crate) fn new() -> Self {
        Self {
            state: Mutex::new(State {
                items: VecDeque::new(),
                closed: false,
            }),
            ready: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // A poisoned lock only means a panic elsewhere while holding it; the deque is intact.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds an item, waking one waiting thread.
    pub(crate) fn push(&self, item: T) -> Result<(), Closed<T>> {
        let mut state = self.lock();
        if state.closed {
            return Err(Closed(item));
        }
        state.items.push_back(item);
        drop(state);
        self.ready.notify_one();
        Ok(())
    }

    /// The next item, waiting for one; `None` once the queue is closed and empty.
    pub(crate) fn pop(&self) -> Option<T> {
        let mut state = self.lock();
        loop {
            if let Some(item) = state.items.pop_front() {
                return Some(item);
            }
            if state.closed {
                return None;
            }
            state = self
                .ready
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// The next item if one is waiting.
    pub(crate) fn try_pop(&self) -> Option<T> {
        self.lock().items.pop_front()
    }

    /// Refuses new items; the waiting threads take what is left, then get `None`.
    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn items_come_out_in_order_until_closed() {
        let q = Arc::new(Queue::new());
        let consumer = {
            let q = q.clone();
            std::thread::spawn(move || std::iter::from_fn(|| q.pop()).collect::<Vec<u32>>())
        };
        for i in 0..100 {
            assert!(q.push(i).is_ok());
        }
        q.close();
        assert!(q.push(100).is_err(), "a closed queue refuses items");
        assert_eq!(consumer.join().unwrap(), (0..100).collect::<Vec<_>>());
        assert!(q.try_pop().is_none());
    }
}
