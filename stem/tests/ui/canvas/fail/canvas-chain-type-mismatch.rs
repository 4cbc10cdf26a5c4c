// A chain step whose first parameter is not the previous step's output.

use stem::task;

#[task]
async fn count(text: String) -> usize {
    text.len()
}

#[task]
async fn shout(text: String, times: u32) -> String {
    text.repeat(times as usize)
}

fn main() {
    let _ = stem::canvas!(chain[count("hello"), shout(3)]);
}
