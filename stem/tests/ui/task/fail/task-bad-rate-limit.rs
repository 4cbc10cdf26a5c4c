use stem::task;

#[task(rate_limit = "10 per second")]
async fn ping() {}

#[task(rate_limit = "0/s")]
async fn pong() {}

#[task(rate_limit = "5/d")]
async fn daily() {}

fn main() {}
