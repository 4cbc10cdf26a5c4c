// An empty chain (or chord header) has nothing to run.

use stem::task;

#[task]
async fn total(values: Vec<i64>) -> i64 {
    values.iter().sum()
}

fn main() {
    let _ = stem::canvas!(chain[]);
    let _ = stem::canvas!(chord[] => total());
}
