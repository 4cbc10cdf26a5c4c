//! Procedural macros for Stem. Use them through the `stem` crate.

use proc_macro::TokenStream;

/// Turn an `async fn` into a Stem task. See the `stem` crate docs.
#[proc_macro_attribute]
pub fn task(_attr: TokenStream, item: TokenStream) -> TokenStream {
    item
}
