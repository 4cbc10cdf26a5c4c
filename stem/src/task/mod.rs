//! Tasks: the [`Task`] trait that `#[task]` implements, typed arguments, and the registry.

mod args;
pub(crate) mod context;
mod error;
mod options;
mod registry;
mod signature;

use std::future::Future;

use serde::Serialize;
use serde::de::DeserializeOwned;

pub use args::{ArgsError, TaskArgs};
pub use context::TaskContext;
pub use error::{KIND_HARD_TIME_LIMIT, KIND_PANIC, KIND_RESULT_ENCODE, KIND_RETRY, TaskError};
pub use options::{Backoff, RateLimit, TaskOptions};
pub(crate) use registry::ErasedFuture;
pub use registry::{Registry, RegistryError, TaskEntry};
pub use signature::{EnqueueOptions, Signature};

/// A task type: its name, defaults, typed arguments and output, and how to run it.
///
/// `#[task]` implements this on a marker type named after the function; implement it by hand
/// for tasks that are not plain functions.
pub trait Task: Send + Sync + 'static {
    /// Arguments as a tuple, in parameter order (the context excluded).
    type Args: TaskArgs;
    /// What the task returns on success.
    type Output: Serialize + DeserializeOwned + Send + 'static;
    /// Registered name (stable across refactors; the default is `module::path::fn_name`).
    const NAME: &'static str;
    /// Parameter names, the keys of the JSON argument object.
    const PARAMS: &'static [&'static str];
    /// Defaults for every enqueue of this task.
    const OPTIONS: TaskOptions;

    /// Run one attempt.
    fn run(
        ctx: TaskContext,
        args: Self::Args,
    ) -> impl Future<Output = Result<Self::Output, TaskError>> + Send;
}

/// Turns a task function's return value into `Result<Output, TaskError>`.
///
/// Implemented for `Result<T, E>` where `E` converts into [`TaskError`]; `#[task]` uses it for
/// functions returning a `Result`, and wraps other return types in `Ok`.
pub trait IntoTaskResult {
    /// The success type.
    type Output;
    /// Convert.
    fn into_task_result(self) -> Result<Self::Output, TaskError>;
}

impl<T, E: Into<TaskError>> IntoTaskResult for Result<T, E> {
    type Output = T;
    fn into_task_result(self) -> Result<T, TaskError> {
        self.map_err(Into::into)
    }
}
