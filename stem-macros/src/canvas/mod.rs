//! `canvas!`: a tiny grammar ([`parse`]) expanded into calls of the typed builders in
//! `stem::canvas` ([`expand`]), so rustc checks every chain step against the step before it
//! and reports a mismatch at that step.

mod expand;
mod parse;

use proc_macro2::TokenStream;

/// Expand `canvas!(input)`.
pub(crate) fn expand(input: TokenStream) -> TokenStream {
    match syn::parse2::<parse::Canvas>(input) {
        Ok(canvas) => match parse::validate(&canvas) {
            Ok(()) => expand::expand(&canvas),
            Err(err) => err.into_compile_error(),
        },
        Err(err) => err.into_compile_error(),
    }
}

#[cfg(test)]
mod tests {
    use quote::quote;

    fn expand(input: proc_macro2::TokenStream) -> String {
        super::expand(input).to_string()
    }

    #[test]
    fn chain_steps_after_the_first_are_partial() {
        let out = expand(quote!(chain[add(1, 2), add(10), ~mul(2, 3)]));
        assert!(out.contains("add :: new (1 , 2)"), "{out}");
        assert!(out.contains("add :: partial (10)"), "{out}");
        assert!(out.contains("mul :: new (2 , 3)"), "{out}");
        assert!(out.contains(". then ("), "{out}");
        assert!(!out.contains("compile_error"), "{out}");
    }

    #[test]
    fn chord_body_is_partial_and_options_are_kept() {
        let out = expand(quote!(chord[render(28).queue("r"), render(29)] => receipt("a@b.c")));
        assert!(out.contains("render :: new (28) . queue (\"r\")"), "{out}");
        assert!(out.contains("receipt :: partial (\"a@b.c\")"), "{out}");
        assert!(out.contains(". chord ("), "{out}");
    }

    #[test]
    fn group_members_take_the_group_position() {
        let out = expand(quote!(chain[a(1), group[b(), math::c(2)]]));
        assert!(out.contains("b :: partial ()"), "{out}");
        assert!(out.contains("math :: c :: partial (2)"), "{out}");
        let top = expand(quote!(group[b(1), sig.clone(), add::new(1, 2)]));
        assert!(top.contains("b :: new (1)"), "{top}");
        assert!(top.contains("sig . clone ()"), "{top}");
        assert!(top.contains("add :: new (1 , 2)"), "{top}");
    }

    #[test]
    fn empty_and_misplaced_markers_are_errors() {
        for (input, message) in [
            (quote!(group[]), "empty `group[]`"),
            (quote!(chain[]), "empty `chain[]`"),
            (quote!(chord[] => cb()), "empty `chord[]`"),
            (quote!(chain[a(), ~x]), "`~` marks a task call"),
            (quote!(chord[a()]), "expected `=>`"),
            (quote!(chain[a()] extra), "unexpected token"),
        ] {
            let out = expand(input);
            assert!(out.contains("compile_error"), "{out}");
            assert!(out.contains(message), "{message}: {out}");
        }
    }
}
