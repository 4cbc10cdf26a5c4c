//! Calls inside a canvas: the untyped [`TaskCall`] (name, JSON argument object, options) and
//! the typed [`Partial`] (a call missing its first argument, which the previous step fills).

use std::marker::PhantomData;
use std::time::Duration;

use serde_json::{Map, Value};

use super::{Canvas, Step};
use crate::envelope::TaskId;
use crate::task::{Backoff, EnqueueOptions, Signature, Task, TaskArgs, TaskOptions};

/// One task call by name, with a JSON argument object keyed by parameter name.
///
/// Immutable by default: it ignores the previous step's output. [`TaskCall::receives`] makes
/// it partial: the previous output is inserted under that parameter name.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskCall {
    /// Registered task name.
    pub task: String,
    /// Arguments known when the canvas is built.
    pub args: Map<String, Value>,
    /// Call-site options (override the task's defaults field by field).
    pub options: EnqueueOptions,
    /// The task's defaults; `None`: the producer's registry's, else the plain defaults.
    pub defaults: Option<TaskOptions>,
    /// The parameter that receives the previous step's output (`None`: immutable).
    pub receives: Option<String>,
}

impl TaskCall {
    /// An immutable call of `task` with `args` (a JSON object; anything else is kept empty and
    /// fails when the canvas is enqueued).
    pub fn new(task: impl Into<String>, args: Value) -> Self {
        let (args, bad) = match args {
            Value::Object(map) => (map, false),
            _ => (Map::new(), true),
        };
        let mut call = TaskCall {
            task: task.into(),
            args,
            options: EnqueueOptions::default(),
            defaults: None,
            receives: None,
        };
        if bad {
            // Recorded as a reserved key so planning can refuse it with a clear error.
            call.args.insert(NOT_AN_OBJECT.to_owned(), Value::Bool(true));
        }
        call
    }

    /// Make the call partial: the previous step's output becomes argument `param`.
    pub fn receives(mut self, param: impl Into<String>) -> Self {
        self.receives = Some(param.into());
        self
    }

    /// Make the call immutable: it ignores the previous step's output.
    pub fn immutable(mut self) -> Self {
        self.receives = None;
        self
    }

    /// Replace the call-site options.
    pub fn with_options(mut self, options: EnqueueOptions) -> Self {
        self.options = options;
        self
    }

    /// Use these task defaults instead of the registry's.
    pub fn with_defaults(mut self, defaults: TaskOptions) -> Self {
        self.defaults = Some(defaults);
        self
    }

    /// This call with `link` started with its output when it succeeds.
    pub fn link(self, link: impl Into<Canvas>) -> Canvas {
        Canvas::from(self).link(link)
    }

    /// This call with `errback` started when it fails.
    pub fn link_error(self, errback: impl Into<Canvas>) -> Canvas {
        Canvas::from(self).link_error(errback)
    }
}

/// Reserved argument key marking a [`TaskCall`] built from arguments that were not an object.
pub(crate) const NOT_AN_OBJECT: &str = "\u{0}stem-args-not-an-object";

impl<In> Step<In> for TaskCall {
    type Output = Value;
    fn into_canvas(self) -> Canvas {
        Canvas::Task(Box::new(self))
    }
}

/// A task whose first parameter can be filled by the previous step of a chain.
///
/// `#[task]` implements it for every task with at least one parameter (besides the context),
/// together with `my_task::partial(rest..)`.
pub trait PartialTask: Task {
    /// The first parameter's type: what the previous step must output.
    type First;
    /// The other parameters, as a tuple.
    type Rest: TaskArgs;
}

/// A typed call of `T` missing its first argument; the previous step's output fills it.
///
/// `#[task]` generates `my_task::partial(rest..)` returning one of these.
pub struct Partial<T: PartialTask> {
    /// Every argument but the first.
    pub rest: T::Rest,
    /// Call-site options.
    pub options: EnqueueOptions,
    _task: PhantomData<fn() -> T>,
}

impl<T: PartialTask> Partial<T> {
    /// A partial call of `T` with every argument but the first.
    pub fn new(rest: T::Rest) -> Self {
        Partial { rest, options: EnqueueOptions::default(), _task: PhantomData }
    }

    /// Replace all call-site options.
    pub fn with_options(mut self, options: EnqueueOptions) -> Self {
        self.options = options;
        self
    }

    /// The untyped call.
    pub fn into_call(self) -> TaskCall {
        let names = T::PARAMS.get(1..).unwrap_or(&[]);
        TaskCall {
            task: T::NAME.to_owned(),
            args: object(self.rest.to_json(names)),
            options: self.options,
            defaults: Some(T::OPTIONS),
            receives: T::PARAMS.first().map(|p| (*p).to_owned()),
        }
    }
}

macro_rules! partial_setters {
    ($($(#[$doc:meta])* $name:ident($arg:ident: $ty:ty);)*) => {
        impl<T: PartialTask> Partial<T> {
            $(
                $(#[$doc])*
                pub fn $name(mut self, $arg: $ty) -> Self {
                    self.options = self.options.$name($arg);
                    self
                }
            )*
        }
    };
}

partial_setters! {
    /// Publish to `queue`.
    queue(queue: impl Into<String>);
    /// Priority 0–9 (clamped), higher first.
    priority(priority: u8);
    /// Run no earlier than `delay` after this step is started.
    countdown(delay: Duration);
    /// Cancel instead of running if not started within `after` of the canvas's enqueue.
    expires_in(after: Duration);
    /// Use `id` as the task id.
    task_id(id: TaskId);
    /// Allow `retries` retries.
    retries(retries: u32);
    /// Retry with this backoff.
    backoff(backoff: Backoff);
    /// Soft time limit.
    soft_time_limit(limit: Duration);
    /// Hard time limit.
    hard_time_limit(limit: Duration);
    /// Lease length for each delivery.
    visibility_timeout(timeout: Duration);
}

impl<T: PartialTask> Clone for Partial<T>
where
    T::Rest: Clone,
{
    fn clone(&self) -> Self {
        Partial { rest: self.rest.clone(), options: self.options.clone(), _task: PhantomData }
    }
}

impl<T: PartialTask> std::fmt::Debug for Partial<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Partial").field("task", &T::NAME).field("options", &self.options).finish()
    }
}

impl<T: PartialTask> Step<T::First> for Partial<T> {
    type Output = T::Output;
    fn into_canvas(self) -> Canvas {
        Canvas::Task(Box::new(self.into_call()))
    }
}

impl<T: PartialTask> From<Partial<T>> for Canvas {
    fn from(p: Partial<T>) -> Self {
        Canvas::Task(Box::new(p.into_call()))
    }
}

/// The untyped, immutable call of a typed signature.
pub(crate) fn call_of<T: Task>(sig: Signature<T>) -> TaskCall {
    TaskCall {
        task: T::NAME.to_owned(),
        args: object(sig.args.to_json(T::PARAMS)),
        options: sig.options,
        defaults: Some(T::OPTIONS),
        receives: None,
    }
}

/// Argument encoding errors are kept as a reserved key and reported when the canvas is
/// planned (builders stay infallible, like `Signature`).
fn object(args: Result<Value, crate::task::ArgsError>) -> Map<String, Value> {
    match args {
        Ok(Value::Object(map)) => map,
        Ok(_) => Map::from_iter([(NOT_AN_OBJECT.to_owned(), Value::Bool(true))]),
        Err(e) => Map::from_iter([(ENCODE_ERROR.to_owned(), Value::String(e.to_string()))]),
    }
}

/// Reserved argument key carrying an argument encoding error until planning reports it.
pub(crate) const ENCODE_ERROR: &str = "\u{0}stem-args-encode-error";

impl<In, T: Task> Step<In> for Signature<T> {
    type Output = T::Output;
    fn into_canvas(self) -> Canvas {
        Canvas::Task(Box::new(call_of(self)))
    }
}

impl<T: Task> From<Signature<T>> for Canvas {
    fn from(sig: Signature<T>) -> Self {
        Canvas::Task(Box::new(call_of(sig)))
    }
}
