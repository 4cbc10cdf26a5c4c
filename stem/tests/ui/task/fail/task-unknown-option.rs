use stem::task;

#[task(name = "math.add", retry = 3)]
async fn add(a: i64, b: i64) -> i64 {
    a + b
}

#[task(timeout = "30s")]
async fn slow() {}

fn main() {}
