// Default names, explicit registration, and `crate = ".."` through a re-exporting facade.

use stem::{Registry, Task, task};

mod facade {
    pub use stem;
}

#[task]
async fn add(a: i64, b: i64) -> i64 {
    a + b
}

#[task(crate = "crate::facade::stem", name = "via.facade")]
async fn via_facade() {}

mod nested {
    #[stem::task(crate = "::stem")]
    pub(crate) async fn ping() -> String {
        "pong".to_owned()
    }
}

fn main() {
    assert_eq!(<add as Task>::NAME, concat!(module_path!(), "::add"));
    assert_eq!(<nested::ping as Task>::NAME, concat!(module_path!(), "::nested::ping"));
    assert_eq!(<via_facade as Task>::NAME, "via.facade");

    let registry = Registry::new().register::<add>().register::<via_facade>().build().unwrap();
    assert_eq!(registry.names(), [concat!(module_path!(), "::add"), "via.facade"]);
    assert_eq!(registry.get(<add as Task>::NAME).unwrap().params, ["a", "b"]);
    assert!(registry.get(<nested::ping as Task>::NAME).is_none());
}
