use stem::task;

#[task(retries = 3, queue = "math", retries = 5)]
async fn add(a: i64, b: i64) -> i64 {
    a + b
}

fn main() {}
