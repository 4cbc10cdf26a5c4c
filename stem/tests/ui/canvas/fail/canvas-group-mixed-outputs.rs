// Group members must share one output type.

use stem::task;

#[task]
async fn number() -> i64 {
    1
}

#[task]
async fn word() -> String {
    "one".to_owned()
}

fn main() {
    let _ = stem::canvas!(group[number(), word()]);
}
