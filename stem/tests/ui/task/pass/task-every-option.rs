// Every kind of option, checked against the generated `Task` impl and the registry.

use std::time::Duration;

use stem::{RateLimit, Registry, Task, task};

#[task(
    name = "emails.send",
    retries = 5,
    queue = "emails",
    priority = 9,
    soft_time_limit = "500ms",
    hard_time_limit = 30,
    visibility_timeout = "5m",
    expires = "1h",
    backoff_base = "2s",
    backoff_max = "10m",
    backoff_jitter = false,
    ignore_result = true,
    rate_limit = "10/m",
    retry_for = ["io", "timeout"]
)]
pub async fn send(to: String, subject: String, attempts: Option<u32>) {
    let _ = (to, subject, attempts);
}

#[task(rate_limit = "3/s", ignore_result)]
async fn flag_form() -> Vec<u8> {
    Vec::new()
}

#[task(rate_limit = "1/h")]
async fn hourly() {}

fn main() {
    let o = <send as Task>::OPTIONS;
    assert_eq!(<send as Task>::NAME, "emails.send");
    assert_eq!(<send as Task>::PARAMS, ["to", "subject", "attempts"]);
    assert_eq!(o.retries, 5);
    assert_eq!(o.queue, Some("emails"));
    assert_eq!(o.priority, 9);
    assert_eq!(o.soft_time_limit, Some(Duration::from_millis(500)));
    assert_eq!(o.hard_time_limit, Some(Duration::from_secs(30)));
    assert_eq!(o.visibility_timeout, Some(Duration::from_secs(300)));
    assert_eq!(o.expires, Some(Duration::from_secs(3600)));
    assert_eq!(o.backoff.base, Duration::from_secs(2));
    assert_eq!(o.backoff.max, Duration::from_secs(600));
    assert!(!o.backoff.jitter);
    assert!(o.ignore_result);
    assert_eq!(o.rate_limit, Some(RateLimit::new(10, Duration::from_secs(60))));
    assert_eq!(o.retry_for, ["io", "timeout"]);

    assert_eq!(<flag_form as Task>::OPTIONS.rate_limit, Some(RateLimit::new(3, Duration::from_secs(1))));
    assert!(<flag_form as Task>::OPTIONS.ignore_result);
    assert_eq!(<hourly as Task>::OPTIONS.rate_limit, Some(RateLimit::new(1, Duration::from_secs(3600))));
    assert_eq!(<hourly as Task>::OPTIONS.retries, 0);

    // `String` parameters take `impl Into<String>`.
    let sig = send::new("a@b.c", String::from("hi"), Some(2));
    assert_eq!(sig.name(), "emails.send");
    assert_eq!(sig.args, ("a@b.c".to_owned(), "hi".to_owned(), Some(2)));

    let registry = Registry::from_inventory().unwrap();
    assert_eq!(
        registry.names(),
        [
            "emails.send",
            concat!(module_path!(), "::flag_form"),
            concat!(module_path!(), "::hourly")
        ]
    );
    assert_eq!(registry.get("emails.send").unwrap().options.retries, 5);
    assert_eq!(registry.queues(), ["emails"]);
}
