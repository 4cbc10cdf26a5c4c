//! Procedural macros for Stem. Use them through the `stem` crate.
//!
//! Entry points only: each shim converts tokens and calls a `proc_macro2` function, so the
//! logic can be unit-tested without a compiler session.

use proc_macro::TokenStream;

mod task;

/// Turn an `async fn` into a Stem task. See the `stem` crate docs.
#[proc_macro_attribute]
pub fn task(attr: TokenStream, item: TokenStream) -> TokenStream {
    task::expand(attr.into(), item.into()).into()
}
