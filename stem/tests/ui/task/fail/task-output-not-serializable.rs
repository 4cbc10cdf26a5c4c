use stem::{TaskError, task};

pub struct Summary {
    pub total: u64,
}

#[task]
async fn summarize(values: Vec<u64>) -> Summary {
    Summary { total: values.iter().sum() }
}

#[task]
async fn try_summarize(values: Vec<u64>) -> Result<Summary, TaskError> {
    Ok(Summary { total: values.iter().sum() })
}

fn main() {}
