//! The crate's error type.

use crate::task::{ArgsError, RegistryError};

/// A boxed error from an adapter or a driver.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors from producers, brokers, backends and workers.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The broker failed or is unreachable.
    #[error("broker: {0}")]
    Broker(#[source] BoxError),
    /// The result backend failed or is unreachable.
    #[error("result backend: {0}")]
    Backend(#[source] BoxError),
    /// Two tasks share a name.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// Arguments could not be encoded.
    #[error(transparent)]
    Args(#[from] ArgsError),
    /// A value could not be encoded or decoded.
    #[error("encoding: {0}")]
    Encode(#[from] serde_json::Error),
    /// No task is registered under this name.
    #[error("no task named `{0}` is registered")]
    UnknownTask(String),
    /// Bad configuration (URL, option value, environment variable).
    #[error("configuration: {0}")]
    Config(String),
    /// A task's encoded arguments and metadata exceed the producer's limit.
    #[error("task `{task}`: arguments and metadata are {size} bytes, over the limit of {limit} bytes")]
    PayloadTooLarge {
        /// Task name.
        task: String,
        /// Encoded size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The component is shutting down.
    #[error("shutting down")]
    Shutdown,
}

impl Error {
    /// A broker error from anything displayable.
    pub fn broker(e: impl Into<BoxError>) -> Self {
        Error::Broker(e.into())
    }

    /// A backend error from anything displayable.
    pub fn backend(e: impl Into<BoxError>) -> Self {
        Error::Backend(e.into())
    }
}
