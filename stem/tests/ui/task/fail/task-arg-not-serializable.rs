use stem::task;

struct Report {
    rows: Vec<u32>,
}

#[task]
async fn render(title: String, report: Report) -> usize {
    title.len() + report.rows.len()
}

fn main() {}
