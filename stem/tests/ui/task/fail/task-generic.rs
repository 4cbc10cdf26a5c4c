use stem::task;

#[task]
async fn add<T: std::ops::Add<Output = T>>(a: T, b: T) -> T {
    a + b
}

#[task]
async fn sum(items: Vec<i64>) -> i64
where
    i64: Copy,
{
    items.iter().sum()
}

fn main() {}
