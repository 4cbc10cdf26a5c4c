use std::rc::Rc;
use std::sync::Mutex;

use stem::task;

static COUNTER: Mutex<u64> = Mutex::new(0);

#[task]
async fn count(step: u64) -> u64 {
    let shared = Rc::new(step);
    tokio::task::yield_now().await;
    *shared
}

#[task]
async fn bump(step: u64) -> u64 {
    let mut guard = COUNTER.lock().unwrap();
    *guard += step;
    tokio::task::yield_now().await;
    *guard
}

fn main() {}
