use stem::{TaskContext, task};

#[task]
async fn add(a: i64, ctx: TaskContext, b: i64) -> i64 {
    let _ = ctx;
    a + b
}

#[task]
async fn sub(ctx: &TaskContext, a: i64) -> i64 {
    let _ = ctx;
    -a
}

fn main() {}
