//! Fetches that always complete, so a consumer that stops waiting never strands deliveries.
//!
//! A worker shutting down drops its fetch, and it may do so after the server leased
//! deliveries to it: they would stay leased to nobody until their lease lapsed. So a fetch
//! runs on a task of its own and always completes, and what nobody takes goes back at once.
//! Nobody takes it when the caller was dropped before the answer was sent, and also when the
//! answer was sent but the caller was dropped before it looked (its wake-up lost a race
//! with the shutdown): the receiving end closes the channel when dropped, so exactly one
//! side, the fetch task or the dropped receiver, holds the unwanted answer and gives it back.

use std::future::Future;
use std::sync::Arc;

use stem::broker::BoxFuture;
use stem::error::Result;
use tokio::sync::oneshot;

/// Gives back an answer nobody took.
type GiveBack<T> = Arc<dyn Fn(T) -> BoxFuture<'static, ()> + Send + Sync>;

/// Run `fetch` on its own task and return its answer; if the caller is dropped first, the
/// answer goes to `give_back` (on a task of its own).
pub(crate) async fn fetch_detached<T, F, G>(fetch: F, give_back: G) -> Result<T>
where
    T: Send + 'static,
    F: Future<Output = Result<T>> + Send + 'static,
    G: Fn(T) -> BoxFuture<'static, ()> + Send + Sync + 'static,
{
    let give_back: GiveBack<T> = Arc::new(give_back);
    let (tx, rx) = oneshot::channel();
    let on_refusal = Arc::clone(&give_back);
    tokio::spawn(async move {
        if let Err(Ok(unwanted)) = tx.send(fetch.await) {
            on_refusal(unwanted).await;
        }
    });
    let mut receiving = Receiving { rx: Some(rx), give_back };
    let answer = match receiving.rx.as_mut() {
        Some(rx) => rx.await,
        None => return Err(stem::Error::broker("fetch answer taken twice")),
    };
    // Answered: nothing left for the drop guard.
    receiving.rx = None;
    answer.map_err(|_| stem::Error::broker("the fetch task stopped before answering"))?
}

/// The receiving end; when dropped unanswered it closes the channel and gives back an answer
/// that arrived meanwhile.
struct Receiving<T: Send + 'static> {
    rx: Option<oneshot::Receiver<Result<T>>>,
    give_back: GiveBack<T>,
}

impl<T: Send + 'static> Drop for Receiving<T> {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else { return };
        // After `close` the fetch task can no longer send: an answer is either here already
        // or goes back through the task.
        rx.close();
        if let Ok(Ok(unwanted)) = rx.try_recv() {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn((self.give_back)(unwanted));
                }
                Err(_) => tracing::warn!(
                    "a fetch was abandoned outside a runtime; its deliveries come back when their lease lapses"
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;
    use std::task::Poll;

    use parking_lot::Mutex;

    use super::*;

    type Given = Arc<Mutex<Vec<u32>>>;

    fn recorder(given: &Given) -> impl Fn(u32) -> BoxFuture<'static, ()> + Send + Sync + 'static {
        let given = Arc::clone(given);
        move |v| {
            let given = Arc::clone(&given);
            Box::pin(async move { given.lock().push(v) })
        }
    }

    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn an_answer_taken_is_never_given_back() {
        let given = Given::default();
        assert_eq!(fetch_detached(async { Ok(1) }, recorder(&given)).await.unwrap(), 1);
        settle().await;
        assert!(given.lock().is_empty());
    }

    #[tokio::test]
    async fn a_caller_dropped_before_the_answer_gets_it_given_back() {
        let given = Given::default();
        let (go, wait) = oneshot::channel::<()>();
        let mut call = Box::pin(fetch_detached(
            async move {
                let _ = wait.await;
                Ok(2)
            },
            recorder(&given),
        ));
        assert!(poll_fn(|cx| Poll::Ready(call.as_mut().poll(cx).is_pending())).await);
        drop(call);
        let _ = go.send(());
        settle().await;
        assert_eq!(*given.lock(), vec![2]);
    }

    #[tokio::test]
    async fn an_answer_sent_to_a_caller_dropped_before_it_looked_is_given_back() {
        let given = Given::default();
        let mut call = Box::pin(fetch_detached(async { Ok(3) }, recorder(&given)));
        assert!(poll_fn(|cx| Poll::Ready(call.as_mut().poll(cx).is_pending())).await);
        // The fetch task runs and sends; the caller is dropped without being polled again.
        settle().await;
        drop(call);
        settle().await;
        assert_eq!(*given.lock(), vec![3]);
    }
}
