// Every shape `canvas!` accepts, type-checked, and the untyped canvas each one builds.

use stem::canvas::{Canvas, CanvasFailure, NoInput, Step, StepExt};
use stem::task;

#[task(name = "ui.add")]
async fn add(a: i64, b: i64) -> i64 {
    a + b
}

#[task(name = "ui.sum")]
async fn sum(values: Vec<i64>) -> i64 {
    values.iter().sum()
}

#[task(name = "ui.label")]
async fn label(n: i64, prefix: String) -> String {
    format!("{prefix}{n}")
}

#[task(name = "ui.ping")]
async fn ping() {}

#[task(name = "ui.on_error")]
async fn on_error(failure: CanvasFailure, who: String) {
    let _ = (failure, who);
}

fn shape<S: Step<NoInput>>(s: S) -> Canvas {
    s.into_canvas()
}

fn names(c: &Canvas) -> String {
    match c {
        Canvas::Task(call) => match &call.receives {
            Some(p) => format!("{}({p}<-)", call.task),
            None => call.task.clone(),
        },
        Canvas::Chain(steps) => format!("chain[{}]", steps.iter().map(names).collect::<Vec<_>>().join(", ")),
        Canvas::Group(members) => {
            format!("group[{}]", members.iter().map(names).collect::<Vec<_>>().join(", "))
        }
        Canvas::Chord { header, body } => {
            format!("chord[{}] => {}", header.iter().map(names).collect::<Vec<_>>().join(", "), names(body))
        }
        Canvas::Linked { node, links, errbacks } => {
            format!("{} link {} err {}", names(node), links.len(), errbacks.len())
        }
        _ => "?".to_owned(),
    }
}

fn main() {
    // A chain: later steps receive the previous output; `~` steps do not.
    let c = canvas_check(stem::canvas!(chain[add(1, 2), add(10), ~add(2, 3), label("n="), ~ping()]));
    assert_eq!(c, "chain[ui.add, ui.add(a<-), ui.add, ui.label(n<-), ui.ping]");

    // Per-element options and explicit constructors.
    let c = shape(stem::canvas!(chain[add(1, 2).queue("math").priority(7), add::partial(3), add::new(1, 1)]));
    assert_eq!(names(&c), "chain[ui.add, ui.add(a<-), ui.add]");

    // Groups, chords, and their nesting.
    let g = shape(stem::canvas!(group[add(1, 1), add(2, 2)]));
    assert_eq!(names(&g), "group[ui.add, ui.add]");
    let d = shape(stem::canvas!(chord[add(1, 1), chain[add(2, 2), add(1)]] => sum()));
    assert_eq!(names(&d), "chord[ui.add, chain[ui.add, ui.add(a<-)]] => ui.sum(values<-)");
    let n = shape(stem::canvas!(chain[add(1, 2), group[add(1), add(2)], sum(), chord[add(1)] => sum()]));
    assert_eq!(
        names(&n),
        "chain[ui.add, group[ui.add(a<-), ui.add(a<-)], ui.sum(values<-), chord[ui.add(a<-)] => ui.sum(values<-)]"
    );

    // Variables and callbacks.
    let step = add::partial(5).link(label::partial("ok:")).link_error(on_error::partial("ops"));
    let l = shape(stem::canvas!(chain[add(1, 2), step]));
    assert_eq!(names(&l), "chain[ui.add, ui.add(a<-) link 1 err 1]");
}

fn canvas_check<S: Step<NoInput>>(s: S) -> String {
    names(&s.into_canvas())
}
