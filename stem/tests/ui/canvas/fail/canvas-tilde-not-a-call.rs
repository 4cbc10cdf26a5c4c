// `~` marks a task call immutable; it cannot go before anything else.

use stem::task;

#[task]
async fn add(a: i64, b: i64) -> i64 {
    a + b
}

fn main() {
    let step = add::new(1, 2);
    let _ = stem::canvas!(chain[add(1, 2), ~step]);
}
