// A mismatch deep inside a nested canvas points at the offending step.

use stem::task;

#[task]
async fn add(a: i64, b: i64) -> i64 {
    a + b
}

#[task]
async fn parse(text: String) -> i64 {
    text.len() as i64
}

fn main() {
    let _ = stem::canvas!(group[chain[add(1, 2), add(3)], chain[add(4, 5), parse()]]);
}
