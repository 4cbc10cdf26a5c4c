//! Which task names this process can run: `#[task]` entries collected by `inventory`, plus
//! explicit `Registry::register::<T>()` calls.

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use serde_json::Value;

use super::{ArgsError, Task, TaskArgs, TaskContext, TaskError, TaskOptions};

/// The boxed future of one erased task run.
pub(crate) type ErasedFuture = Pin<Box<dyn Future<Output = Result<Value, TaskError>> + Send>>;

type ErasedRun = fn(TaskContext, &Value) -> Result<ErasedFuture, ArgsError>;

/// One registered task: name, defaults, where it was defined, and its type-erased runner.
#[derive(Clone, Copy)]
pub struct TaskEntry {
    /// Registered name.
    pub name: &'static str,
    /// Parameter names.
    pub params: &'static [&'static str],
    /// Default options.
    pub options: TaskOptions,
    /// `module_path!()` of the definition.
    pub module: &'static str,
    /// `file!()` of the definition.
    pub file: &'static str,
    /// `line!()` of the definition.
    pub line: u32,
    run: ErasedRun,
    type_id: fn() -> std::any::TypeId,
    type_name: fn() -> &'static str,
}

impl TaskEntry {
    /// The entry for task type `T`, defined at `module`/`file`/`line`.
    pub const fn of<T: Task>(module: &'static str, file: &'static str, line: u32) -> Self {
        TaskEntry {
            name: T::NAME,
            params: T::PARAMS,
            options: T::OPTIONS,
            module,
            file,
            line,
            run: run_erased::<T>,
            type_id: std::any::TypeId::of::<T>,
            type_name: std::any::type_name::<T>,
        }
    }

    /// Decode `args` and start one run. An argument error means the task cannot run at all.
    pub(crate) fn start(&self, ctx: TaskContext, args: &Value) -> Result<ErasedFuture, ArgsError> {
        (self.run)(ctx, args)
    }

    fn location(&self) -> String {
        format!("`{}` ({}:{})", (self.type_name)(), self.file, self.line)
    }

    /// The same task type, registered twice (say through inventory and explicitly).
    fn same_definition(&self, other: &TaskEntry) -> bool {
        (self.type_id)() == (other.type_id)()
    }
}

impl fmt::Debug for TaskEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskEntry")
            .field("name", &self.name)
            .field("params", &self.params)
            .field("location", &self.location())
            .finish()
    }
}

fn run_erased<T: Task>(ctx: TaskContext, args: &Value) -> Result<ErasedFuture, ArgsError> {
    let args = T::Args::from_json(args, T::PARAMS)?;
    Ok(Box::pin(async move {
        let out = T::run(ctx, args).await?;
        serde_json::to_value(out)
            .map_err(|e| TaskError::new(super::KIND_RESULT_ENCODE, e).with_retryable(false))
    }))
}

#[cfg(feature = "auto-register")]
inventory::collect!(TaskEntry);

/// Two definitions share one task name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// The same name was registered by two different definitions.
    #[error("task name `{name}` is defined twice: at {first} and at {second}")]
    Duplicate {
        /// The shared name.
        name: String,
        /// Where the first definition is.
        first: String,
        /// Where the second definition is.
        second: String,
    },
}

/// The tasks a worker can run, by name.
///
/// Build one from every `#[task]` linked into the binary with [`Registry::from_inventory`], or
/// list tasks explicitly with [`Registry::register`] (needed where `inventory` does not work,
/// such as some wasm targets). A crate whose tasks you want must be linked: if nothing else
/// names it, add `use my_tasks as _;`.
#[derive(Default, Clone)]
pub struct Registry {
    entries: std::collections::HashMap<&'static str, TaskEntry, foldhash::fast::RandomState>,
    errors: Vec<RegistryError>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every `#[task]` in the binary, checked for duplicate names.
    #[cfg(feature = "auto-register")]
    pub fn from_inventory() -> Result<Self, RegistryError> {
        Self::new().with_inventory().build()
    }

    /// Add every `#[task]` in the binary.
    #[cfg(feature = "auto-register")]
    pub fn with_inventory(mut self) -> Self {
        let mut all: Vec<&TaskEntry> = inventory::iter::<TaskEntry>.into_iter().collect();
        // inventory yields in no set order; sort so duplicate reports are deterministic.
        all.sort_by(|a, b| (a.name, a.file, a.line).cmp(&(b.name, b.file, b.line)));
        for entry in all {
            self.add(*entry);
        }
        self
    }

    /// Add task type `T` (its definition site is recorded as this call's caller).
    #[track_caller]
    pub fn register<T: Task>(mut self) -> Self {
        let loc = std::panic::Location::caller();
        self.add(TaskEntry::of::<T>("<explicit>", loc.file(), loc.line()));
        self
    }

    /// Add one entry.
    pub fn add(&mut self, entry: TaskEntry) {
        match self.entries.get(entry.name) {
            Some(existing) if existing.same_definition(&entry) => {}
            Some(existing) => self.errors.push(RegistryError::Duplicate {
                name: entry.name.to_owned(),
                first: existing.location(),
                second: entry.location(),
            }),
            None => {
                self.entries.insert(entry.name, entry);
            }
        }
    }

    /// Finish: fails on the first duplicate name found.
    pub fn build(self) -> Result<Self, RegistryError> {
        match self.errors.first() {
            Some(e) => Err(e.clone()),
            None => Ok(self),
        }
    }

    /// Look a task up by name.
    pub fn get(&self, name: &str) -> Option<&TaskEntry> {
        self.entries.get(name)
    }

    /// Registered names, sorted.
    pub fn names(&self) -> Vec<&'static str> {
        let mut names: Vec<_> = self.entries.keys().copied().collect();
        names.sort_unstable();
        names
    }

    /// Number of tasks.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no task is registered.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Queues named by registered tasks' defaults.
    pub fn queues(&self) -> Vec<&'static str> {
        let mut qs: Vec<_> = self.entries.values().filter_map(|e| e.options.queue).collect();
        qs.sort_unstable();
        qs.dedup();
        qs
    }
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry").field("tasks", &self.names()).finish()
    }
}
