//! The Lua scripts, compiled in with `include_str!` and run with `EVALSHA` (loaded on a
//! `NOSCRIPT` answer, e.g. after a server restart).

use std::sync::LazyLock;

use redis::aio::ConnectionManager;
use redis::{Cmd, FromRedisValue, RedisResult, Script};

macro_rules! broker_script {
    ($name:ident, $file:literal) => {
        pub(crate) static $name: LazyLock<Script> =
            LazyLock::new(|| Script::new(concat!(include_str!("scripts/common.lua"), include_str!($file))));
    };
}

macro_rules! script {
    ($name:ident, $file:literal) => {
        pub(crate) static $name: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!($file)));
    };
}

broker_script!(PUBLISH, "scripts/publish.lua");
broker_script!(CONSUME, "scripts/consume.lua");
broker_script!(ACK, "scripts/ack.lua");
broker_script!(NACK, "scripts/nack.lua");
broker_script!(RETRY, "scripts/retry.lua");
broker_script!(EXTEND, "scripts/extend.lua");
broker_script!(DEAD, "scripts/dead.lua");
broker_script!(REPLAY, "scripts/replay.lua");
broker_script!(PURGE, "scripts/purge.lua");
broker_script!(COUNTS, "scripts/counts.lua");
broker_script!(BROADCAST, "scripts/broadcast.lua");

script!(SET_STATUS, "scripts/set_status.lua");
script!(PROGRESS, "scripts/progress.lua");
script!(GROUP_INIT, "scripts/group_init.lua");
script!(GROUP_RECORD, "scripts/group_record.lua");
script!(CHORD_CLAIM, "scripts/chord_claim.lua");
script!(HEARTBEAT, "scripts/heartbeat.lua");
script!(WORKERS, "scripts/workers.lua");

/// An `EVALSHA` call being built: arguments are written straight into the command buffer.
pub(crate) struct Eval {
    script: &'static Script,
    cmd: Cmd,
}

impl Eval {
    /// A call of `script` (no KEYS; the namespace is the first argument by convention).
    pub(crate) fn new(script: &'static LazyLock<Script>) -> Self {
        let script: &'static Script = script;
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(script.get_hash()).arg(0);
        Eval { script, cmd }
    }

    /// Append an argument.
    pub(crate) fn arg<T: redis::ToRedisArgs>(&mut self, arg: T) -> &mut Self {
        self.cmd.arg(arg);
        self
    }

    /// Run it, loading the script first if the server does not know it.
    pub(crate) async fn run<T: FromRedisValue>(&self, conn: &mut ConnectionManager) -> RedisResult<T> {
        match self.cmd.query_async(conn).await {
            Err(e) if e.code() == Some("NOSCRIPT") => {
                self.script.load_async(conn).await?;
                self.cmd.query_async(conn).await
            }
            other => other,
        }
    }
}
