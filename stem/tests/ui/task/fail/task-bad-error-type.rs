use stem::task;

pub struct ParseFailure;

#[task]
async fn parse(text: String) -> Result<i64, ParseFailure> {
    text.parse().map_err(|_| ParseFailure)
}

fn main() {}
