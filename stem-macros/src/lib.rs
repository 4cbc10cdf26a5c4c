//! Procedural macros for Stem. Use them through the `stem` crate.
//!
//! Entry points only: each shim converts tokens and calls a `proc_macro2` function, so the
//! logic can be unit-tested without a compiler session.

use proc_macro::TokenStream;

mod canvas;
mod task;

/// Turn an `async fn` into a Stem task.
///
/// The function stays as written. Next to it the macro adds a braced struct of the same name
/// (types and functions live in different namespaces) that implements `stem::Task`, a
/// constructor `name::new(args..)` returning a typed `stem::Signature`, and, with the
/// `auto-register` feature, an entry that `Registry::from_inventory()` finds.
///
/// ```ignore
/// use stem::{TaskContext, TaskError, task};
///
/// #[task(name = "math.add", retries = 3, queue = "math")]
/// pub async fn add(ctx: TaskContext, a: i64, b: i64) -> Result<i64, TaskError> {
///     Ok(a + b)
/// }
///
/// // app.enqueue(add::new(1, 2)).await?
/// ```
///
/// The function must be a non-generic `async fn` without `self`. An optional first parameter
/// of type `TaskContext` gives access to the running task; every other parameter is an owned
/// type implementing `Serialize + DeserializeOwned + Send + 'static` (they travel as a JSON
/// object keyed by parameter name). A `Result<T, E>` return (or an alias named `..Result`)
/// with `E: Into<TaskError>` can fail; any other return type always succeeds.
///
/// Options:
///
/// | option | value | |
/// |---|---|---|
/// | `name` | `"str"` | registered name; default `module_path!()::fn_name`, so moving the function renames it |
/// | `retries` | integer | retries after the first attempt |
/// | `queue` | `"str"` | queue to publish to |
/// | `priority` | integer `0..=9` | higher runs first |
/// | `soft_time_limit`, `hard_time_limit`, `visibility_timeout`, `expires`, `backoff_base`, `backoff_max` | `"500ms"`, `"30s"`, `"5m"`, `"1h"` or an integer (seconds) | durations |
/// | `backoff_jitter`, `ignore_result` | `true` / `false` (a bare key means `true`) | |
/// | `rate_limit` | `"N/s"`, `"N/m"` or `"N/h"` | at most N starts per period |
/// | `retry_for` | `["kind", ..]` | only retry errors of these kinds |
/// | `crate` | `"path"` | path to `stem` when it is re-exported, e.g. `"my_facade::stem"` |
#[proc_macro_attribute]
pub fn task(attr: TokenStream, item: TokenStream) -> TokenStream {
    task::expand(attr.into(), item.into()).into()
}

/// Compose tasks into chains, groups and chords, type-checked step by step.
///
/// ```ignore
/// use stem::prelude::*;
///
/// // add(1, 2) → add(<3>, 10): each step after the first receives the previous output as its
/// // first argument, so `add(10)` is `add::partial(10)`.
/// let c = canvas!(chain[add(1, 2), add(10), ~notify("done")]);
/// let g = canvas!(group[add(1, 1), add(2, 2)]);                 // Vec<i64>, member order
/// let d = canvas!(chord[add(1, 1), add(2, 2)] => sum());         // sum(Vec<i64>)
/// let n = canvas!(chain[fetch(1), group[parse(), parse_fast()], merge()]);
/// // app.enqueue_canvas(c).await?.wait(timeout).await?
/// ```
///
/// Grammar:
///
/// | element | meaning |
/// |---|---|
/// | `chain[e, ..]` | one after the other |
/// | `group[e, ..]` | in parallel; outputs `Vec<T>` in member order (members share `T`) |
/// | `chord[e, ..] => body` | a group, then `body` receiving its `Vec<T>` |
/// | `task(args..)` | a call of a `#[task]`: `task::new(args..)` at the start, and `task::partial(args..)` (first argument omitted, filled by the previous output) after a step or as a chord body |
/// | `~task(args..)` | immutable: all arguments given, ignores the previous output |
/// | `task(..).queue("q").priority(5)` | per-element options |
/// | any other expression | a typed piece as is: `add::new(1, 2)`, a variable holding a `Chain`, .. |
///
/// Errors point at the element: a step whose first parameter is not the previous output's
/// type, group members with different output types, an empty `chain[]` / `group[]` /
/// `chord[]`, a `~` that is not before a task call.
#[proc_macro]
pub fn canvas(input: TokenStream) -> TokenStream {
    canvas::expand(input.into()).into()
}
