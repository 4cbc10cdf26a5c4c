//! What a task module usually needs: `use stem::prelude::*;`.

pub use crate::app::StemApp;
pub use crate::backend::{TaskState, TaskStatus};
pub use crate::canvas::{CanvasHandle, StepExt};
pub use crate::producer::Stem;
pub use crate::result::{TaskHandle, WaitError};
pub use crate::task::{EnqueueOptions, Signature, Task, TaskContext, TaskError};
#[cfg(feature = "macros")]
pub use stem_macros::{canvas, task};
