// A chord callback that does not take the header's outputs.

use stem::task;

#[task]
async fn render(page: u32) -> Vec<u8> {
    vec![page as u8]
}

#[task]
async fn total(values: Vec<i64>) -> i64 {
    values.iter().sum()
}

fn main() {
    let _ = stem::canvas!(chord[render(1), render(2)] => total());
}
