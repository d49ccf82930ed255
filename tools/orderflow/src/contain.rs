//! Calling the testkit from a binary.
//!
//! `orderflow up` runs the servers of `orderflow-testkit`, whose documented contract is to
//! fail by panicking with a message saying what failed (it is test support). This tool reports
//! failure with `anyhow` errors instead and must stop what it started, so every testkit call
//! goes through [`catch`] or [`blocking`], which turn such a panic into an error carrying the
//! testkit's message. The panic hook installed by [`install_panic_hook`] keeps these expected
//! panics quiet (their message is in the error), while any other panic is still printed by
//! the default hook.

use std::any::Any;
use std::cell::Cell;
use std::future::Future;
use std::panic::{self, AssertUnwindSafe};

use anyhow::{Context as _, anyhow};

thread_local! {
    /// Set while this thread runs a call under [`catch`]: its panic becomes an error.
    static CATCHING: Cell<bool> = const { Cell::new(false) };
}

/// Installs a panic hook that stays silent for panics turned into errors by [`catch`] and
/// defers to the previous hook for all others.
pub fn install_panic_hook() {
    let previous = panic::take_hook();
    panic::set_hook(Box::new(move |info| {
        if !CATCHING.with(Cell::get) {
            previous(info);
        }
    }));
}

/// Runs `f` on this thread; a panic becomes the error "`what`: `panic message`".
///
/// `f` must not be left half-done in a way that matters: a testkit handle whose call panicked
/// is dropped (which stops its process) by the caller.
pub fn catch<T>(what: &str, f: impl FnOnce() -> T) -> anyhow::Result<T> {
    let was_catching = CATCHING.with(|c| c.replace(true));
    let result = panic::catch_unwind(AssertUnwindSafe(f));
    CATCHING.with(|c| c.set(was_catching));
    result
        .map_err(|payload| anyhow!("{}", panic_message(payload.as_ref())).context(what.to_owned()))
}

/// Runs the blocking `f` on tokio's blocking pool under [`catch`].
pub async fn blocking<T, F>(what: impl Into<String>, f: F) -> anyhow::Result<T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let what = what.into();
    let context = what.clone();
    tokio::task::spawn_blocking(move || catch(&what, f))
        .await
        .with_context(|| format!("{context}: the worker thread failed"))?
}

/// Runs the future made by `make` to completion on one thread of tokio's blocking pool under
/// [`catch`] (a future that moved between threads could not be caught reliably). Timers and
/// sockets are still driven by the current runtime.
pub async fn blocking_async<T, Fut, F>(what: impl Into<String>, make: F) -> anyhow::Result<T>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T>,
    T: Send + 'static,
{
    let handle = tokio::runtime::Handle::current();
    blocking(what, move || handle.block_on(make())).await
}

/// The message of a panic payload (`panic!` gives a `&str` or a `String`).
fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(message) = payload.downcast_ref::<&str>() {
        (*message).to_owned()
    } else if let Some(message) = payload.downcast_ref::<String>() {
        message.clone()
    } else {
        "panicked without a message".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_an_error_with_its_message() {
        install_panic_hook();
        let error = catch("starting the thing", || panic!("port {} is taken", 4222)).unwrap_err();
        assert_eq!(
            format!("{error:#}"),
            "starting the thing: port 4222 is taken"
        );
        assert_eq!(catch("adding", || 1 + 1).unwrap(), 2);
        assert!(!CATCHING.with(Cell::get), "the flag is reset");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn blocking_calls_are_caught_too() {
        let error = blocking_async("waiting", || async {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            panic!("gave up")
        })
        .await
        .unwrap_err();
        assert_eq!(format!("{error:#}"), "waiting: gave up");
        assert_eq!(blocking("reading", || 7).await.unwrap(), 7);
    }
}
