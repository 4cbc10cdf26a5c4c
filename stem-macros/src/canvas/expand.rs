//! Generate typed builder calls: `chain[a, b]` → `Chain::new(a).then(b)`, `group[a, b]` →
//! `Group::new().member(a).member(b)`, `chord[..] => c` → `Group::new()...chord(c)`; a shorthand
//! `task(args..)` → `task::new(args..)`, or `task::partial(args..)` where the previous output
//! fills the first argument. Each builder call is spanned at its element, so a type error
//! (a step that does not take the previous output, a group member with another output type)
//! lands on the element.

use proc_macro2::{Ident, TokenStream};
use quote::{ToTokens, quote, quote_spanned};
use syn::Expr;
use syn::spanned::Spanned;

use super::parse::{Canvas, Element, shorthand};

/// The canvas, checked to run first (after nothing).
pub(crate) fn expand(canvas: &Canvas) -> TokenStream {
    let p = quote!(::stem::__private);
    let root = element(&p, &canvas.root, false);
    let span = canvas.root.span();
    quote_spanned!(span=> #p::canvas_root(#root))
}

/// One element; `partial`: it runs after a step whose output it receives.
fn element(p: &TokenStream, element: &Element, partial: bool) -> TokenStream {
    match element {
        Element::Chain(list) => {
            let mut items = list.items.iter();
            let Some(first) = items.next() else { return TokenStream::new() };
            let span = first.span();
            let first = self::element(p, first, partial);
            let mut out = quote_spanned!(span=> #p::Chain::new(#first));
            for item in items {
                let span = item.span();
                let step = self::element(p, item, true);
                out = quote_spanned!(span=> #out.then(#step));
            }
            out
        }
        Element::Group(list) => group(p, &list.items, partial, list.keyword.span()),
        Element::Chord(list, body) => {
            let header = group(p, &list.items, partial, list.keyword.span());
            let span = body.span();
            let body = self::element(p, body, true);
            quote_spanned!(span=> #header.chord(#body))
        }
        Element::Call { tilde, expr } => call(expr, partial && tilde.is_none()),
    }
}

fn group(p: &TokenStream, items: &[Element], partial: bool, span: proc_macro2::Span) -> TokenStream {
    let mut out = quote_spanned!(span=> #p::Group::new());
    for item in items {
        let span = item.span();
        let member = element(p, item, partial);
        out = quote_spanned!(span=> #out.member(#member));
    }
    out
}

/// A shorthand call rewritten to the task's constructor (options kept); any other expression
/// as written.
fn call(expr: &Expr, partial: bool) -> TokenStream {
    match expr {
        Expr::Call(c) if shorthand(expr).is_some() => {
            let func = &c.func;
            let ctor = Ident::new(if partial { "partial" } else { "new" }, func.span());
            let args = &c.args;
            quote_spanned!(func.span()=> #func::#ctor(#args))
        }
        Expr::MethodCall(m) if shorthand(expr).is_some() => {
            let mut m = m.clone();
            *m.receiver = Expr::Verbatim(call(&m.receiver, partial));
            m.to_token_stream()
        }
        other => other.to_token_stream(),
    }
}
