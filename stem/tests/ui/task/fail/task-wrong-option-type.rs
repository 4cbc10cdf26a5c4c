use stem::task;

#[task(retries = "3", queue = 7, ignore_result = "yes", priority = 12)]
async fn add(a: i64, b: i64) -> i64 {
    a + b
}

#[task(soft_time_limit = "30 seconds", hard_time_limit = 1.5, retry_for = "io")]
async fn slow() {}

fn main() {
    // The task still expands with the valid options, so its uses raise no further errors.
    let _ = add::new(1, 2);
}
