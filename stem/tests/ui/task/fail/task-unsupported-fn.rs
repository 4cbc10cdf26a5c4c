use stem::task;

#[task]
const fn answer() -> u32 {
    42
}

#[task]
async unsafe fn risky() {}

#[task]
async fn pair((a, b): (i64, i64)) -> i64 {
    a + b
}

#[task]
async fn lazy(value: impl Into<String>) -> String {
    value.into()
}

#[task]
struct NotAFunction;

fn main() {}
