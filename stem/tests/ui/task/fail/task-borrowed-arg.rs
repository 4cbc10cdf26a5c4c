use std::borrow::Cow;

use stem::task;

#[task]
async fn greet(name: &str) -> String {
    format!("hello {name}")
}

#[task]
async fn total(items: &[u32]) -> u32 {
    items.iter().sum()
}

#[task]
async fn shout(text: Cow<'_, str>) -> String {
    text.to_uppercase()
}

#[task]
async fn echo(text: String) -> &'static str {
    let _ = text;
    "done"
}

fn main() {}
