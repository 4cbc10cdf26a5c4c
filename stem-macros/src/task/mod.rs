//! `#[task]`: parse the options ([`attr`]), check the function ([`validate`]), generate the
//! marker type and its `Task` impl ([`expand`]).

mod attr;
mod expand;
mod validate;

use proc_macro2::TokenStream;
use quote::ToTokens;

/// Expand `#[task(attr)] item`.
///
/// Never loses the item: on any error the function is re-emitted unchanged next to the
/// `compile_error!`s. Option errors still expand with the valid options (so calls of
/// `my_task::new(..)` keep type-checking); signature errors emit only the function.
pub(crate) fn expand(attr: TokenStream, item: TokenStream) -> TokenStream {
    let func: syn::ItemFn = match syn::parse2(item.clone()) {
        Ok(func) => func,
        Err(_) => {
            let err = syn::Error::new(
                item_start(&item),
                "`#[task]` goes on an `async fn`, e.g. `#[task] async fn add(a: i64, b: i64) -> i64`",
            );
            return with_errors(item, err);
        }
    };

    let mut errors = Errors::default();
    let options = attr::parse(attr, &mut errors);
    let sig = validate::check(&func, &mut errors);

    match (sig, errors.finish()) {
        (Some(sig), None) => expand::expand(&func, &options, &sig),
        (Some(sig), Some(err)) => {
            let mut out = expand::expand(&func, &options, &sig);
            out.extend(err.into_compile_error());
            out
        }
        (None, Some(err)) => with_errors(func.into_token_stream(), err),
        (None, None) => with_errors(
            item,
            syn::Error::new(proc_macro2::Span::call_site(), "`#[task]` could not read this function"),
        ),
    }
}

/// The first token of `item` after its attributes (`struct`, `pub`, ..), for errors about
/// the item as a whole.
fn item_start(item: &TokenStream) -> proc_macro2::Span {
    use proc_macro2::TokenTree;
    let mut tokens = item.clone().into_iter().peekable();
    while let Some(TokenTree::Punct(p)) = tokens.peek() {
        if p.as_char() != '#' {
            break;
        }
        tokens.next();
        if matches!(tokens.peek(), Some(TokenTree::Punct(p)) if p.as_char() == '!') {
            tokens.next();
        }
        tokens.next();
    }
    tokens.next().map_or_else(proc_macro2::Span::call_site, |t| t.span())
}

/// The item unchanged, followed by the errors (tokio's `token_stream_with_error`).
fn with_errors(mut item: TokenStream, err: syn::Error) -> TokenStream {
    item.extend(err.into_compile_error());
    item
}

/// Collects spanned errors and joins them with [`syn::Error::combine`].
#[derive(Default)]
pub(crate) struct Errors {
    first: Option<syn::Error>,
}

impl Errors {
    /// Record one error.
    pub(crate) fn push(&mut self, err: syn::Error) {
        match &mut self.first {
            Some(first) => first.combine(err),
            None => self.first = Some(err),
        }
    }

    /// Record an error at `tokens` (spanning all of them).
    pub(crate) fn at(&mut self, tokens: impl ToTokens, message: impl std::fmt::Display) {
        self.push(syn::Error::new_spanned(tokens, message));
    }

    /// Every recorded error, combined, if any.
    pub(crate) fn finish(self) -> Option<syn::Error> {
        self.first
    }
}

#[cfg(test)]
mod tests {
    use quote::quote;

    use super::*;

    #[test]
    fn errors_keep_the_item() {
        let out = expand(
            quote!(retries = "x"),
            quote!(
                fn add(a: i64) -> i64 {
                    a
                }
            ),
        );
        let text = out.to_string();
        assert!(text.contains("fn add"), "{text}");
        assert!(text.contains("compile_error"), "{text}");
        assert!(text.contains("must be `async`"), "{text}");
        assert!(text.contains("expects an integer"), "{text}");
    }

    #[test]
    fn non_fn_items_are_kept() {
        let out = expand(
            quote!(),
            quote!(
                struct Foo;
            ),
        );
        let text = out.to_string();
        assert!(text.starts_with("struct Foo"), "{text}");
        assert!(text.contains("goes on an `async fn`"), "{text}");
    }
}
