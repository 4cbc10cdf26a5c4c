// A task without parameters cannot receive the previous output: mark it `~`.

use stem::task;

#[task]
async fn add(a: i64, b: i64) -> i64 {
    a + b
}

#[task]
async fn ping() {}

fn main() {
    let _ = stem::canvas!(chain[add(1, 2), ping()]);
}
