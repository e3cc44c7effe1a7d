//! Running a function's WebAssembly module with `wasmi` (an interpreter), under limits:
//! fuel per call (so an endless loop stops), memory (so a guest cannot take the node's),
//! the size of an answer and the lines it may log. Whatever a guest does, the caller gets
//! a [`FnError`] and the node goes on.
use std::{collections::BTreeMap, fmt};

use wasmi::{Caller, Config, Engine, Instance, Linker, Memory, Store, StoreLimits, StoreLimitsBuilder, TypedFunc};

use super::abi::{self, Answer, Input, Output, StateKey};

/// What one instance may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// Fuel per call (about one unit per instruction).
    pub(crate) fuel_per_call: u64,
    /// Linear memory, bytes.
    pub(crate) memory_bytes: usize,
    /// Largest answer to one batch, bytes.
    pub(crate) answer_bytes_max: usize,
    /// Lines a guest may log per call; more are counted and dropped.
    pub(crate) log_lines_per_call: usize,
}

impl Default for Limits {
    fn default() -> Self {
        // 1e9 units is about a second of interpretation here: far above a normal batch,
        // and a loop still stops promptly. 64 MiB of memory, 16 MiB answers.
        Limits {
            fuel_per_call: 1_000_000_000,
            memory_bytes: 64 << 20,
            answer_bytes_max: 16 << 20,
            log_lines_per_call: 16,
        }
    }
}

/// A log line is cut to this many bytes.
const LOG_LINE_BYTES_MAX: usize = 1024;

/// Why a function could not be loaded, started or run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FnError {
    /// The bytes are not a valid module.
    #[error("not a valid WebAssembly module: {0}")]
    Invalid(String),
    /// The module lacks something the ABI needs, or has it with the wrong type.
    #[error("the module does not follow the rill guest ABI: {0}")]
    Abi(String),
    /// The call used up its fuel.
    #[error("ran out of fuel ({0} units per call): an endless loop, or a batch too large for the limit")]
    OutOfFuel(u64),
    /// The guest wanted more memory than it may have.
    #[error("needed more than its {0} bytes of memory")]
    Memory(usize),
    /// The guest trapped.
    #[error("trapped: {0}")]
    Trap(String),
    /// The answer was larger than allowed.
    #[error("answered {len} bytes, more than the {max} allowed")]
    AnswerTooLarge {
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// An aggregate's states grew past the limit.
    #[error("would keep {bytes} bytes of state, more than the {max} allowed per input topic")]
    StatesTooLarge {
        /// The states' size after the run.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// The answer did not decode.
    #[error("gave a malformed answer: {0}")]
    Malformed(String),
    /// The guest reported that the batch failed.
    #[error("failed: {0}")]
    Failed(String),
    /// `rill_init` refused the parameters.
    #[error("refused to start (rill_init returned {code}): {log}")]
    Init {
        /// What it returned.
        code: i32,
        /// What it logged, one line after another (its reason, if it gave one).
        log: String,
    },
}

/// What one run of a function gave.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Ran {
    /// Its outputs.
    pub(crate) outputs: Vec<Output>,
    /// An aggregate's states that changed, by key (`None`: forgotten).
    pub(crate) states: Vec<(StateKey, Option<Vec<u8>>)>,
}

/// A compiled module, ready to be instantiated (cheap to clone).
#[derive(Clone)]
pub(crate) struct Module {
    engine: Engine,
    module: wasmi::Module,
}

impl fmt::Debug for Module {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Module")
    }
}

impl Module {
    /// Validates and compiles `wasm`.
    pub(crate) fn new(wasm: &[u8]) -> Result<Module, FnError> {
        let mut config = Config::default();
        config.consume_fuel(true);
        let engine = Engine::new(&config);
        let module = wasmi::Module::new(&engine, wasm).map_err(|e| {
            // wasmi's messages may span lines; one line reads better in a log.
            FnError::Invalid(e.to_string().split_whitespace().collect::<Vec<_>>().join(" "))
        })?;
        Ok(Module { engine, module })
    }
}

/// What the host keeps per instance.
struct HostState {
    limits: StoreLimits,
    logs: Vec<String>,
    logs_dropped: u64,
    log_lines_per_call: usize,
}

/// A started instance of a function.
pub(crate) struct Running {
    store: Store<HostState>,
    memory: Memory,
    alloc: TypedFunc<i32, i32>,
    process: TypedFunc<(i32, i32), i64>,
    /// True for an aggregate (`rill_aggregate`, with states).
    aggregate: bool,
    limits: Limits,
}

impl fmt::Debug for Running {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Running").field("limits", &self.limits).finish_non_exhaustive()
    }
}

fn call_error(e: &wasmi::Error, limits: &Limits) -> FnError {
    if e.as_trap_code() == Some(wasmi::TrapCode::OutOfFuel) {
        return FnError::OutOfFuel(limits.fuel_per_call);
    }
    let memory_refused = matches!(
        e.kind(),
        wasmi::errors::ErrorKind::Memory(_)
            | wasmi::errors::ErrorKind::Instantiation(wasmi::errors::InstantiationError::FailedToInstantiateMemory(_))
    );
    if memory_refused || e.as_trap_code() == Some(wasmi::TrapCode::GrowthOperationLimited) {
        return FnError::Memory(limits.memory_bytes);
    }
    FnError::Trap(e.to_string())
}

/// The guest's `rill.log`: keeps a few lines per call, cut to a bounded length.
fn log(mut caller: Caller<'_, HostState>, ptr: i32, len: i32) {
    let state = caller.data();
    if state.logs.len() >= state.log_lines_per_call {
        caller.data_mut().logs_dropped += 1;
        return;
    }
    let Some(wasmi::Extern::Memory(memory)) = caller.get_export("memory") else { return };
    let mut line = vec![0; (len.max(0) as usize).min(LOG_LINE_BYTES_MAX)];
    if memory.read(&caller, ptr as u32 as usize, &mut line).is_err() {
        line = b"<log line outside the guest's memory>".to_vec();
    }
    caller.data_mut().logs.push(String::from_utf8_lossy(&line).into_owned());
}

impl Running {
    /// Instantiates `module` and calls its `rill_init` (if it has one) with `params`.
    pub(crate) fn start(module: &Module, params: &[(String, String)], limits: Limits) -> Result<Running, FnError> {
        let store_limits =
            StoreLimitsBuilder::new().memory_size(limits.memory_bytes).trap_on_grow_failure(true).build();
        let state = HostState {
            limits: store_limits,
            logs: Vec::new(),
            logs_dropped: 0,
            log_lines_per_call: limits.log_lines_per_call,
        };
        let mut store = Store::new(&module.engine, state);
        store.limiter(|s| &mut s.limits);
        store.set_fuel(limits.fuel_per_call).map_err(|e| FnError::Trap(e.to_string()))?;
        let mut linker = Linker::<HostState>::new(&module.engine);
        linker.func_wrap("rill", "log", log).map_err(|e| FnError::Abi(e.to_string()))?;
        let instance: Instance =
            linker.instantiate_and_start(&mut store, &module.module).map_err(|e| match e.kind() {
                wasmi::errors::ErrorKind::Linker(l) => FnError::Abi(l.to_string()),
                _ => call_error(&e, &limits),
            })?;
        let memory = instance.get_memory(&store, "memory").ok_or(FnError::Abi("no exported 'memory'".into()))?;
        let export = |name: &str, e: wasmi::Error| FnError::Abi(format!("export '{name}': {e}"));
        let alloc = instance.get_typed_func::<i32, i32>(&store, "rill_alloc").map_err(|e| export("rill_alloc", e))?;
        let aggregate = instance.get_export(&store, "rill_aggregate").is_some();
        let entry = if aggregate { "rill_aggregate" } else { "rill_process" };
        let process = instance.get_typed_func::<(i32, i32), i64>(&store, entry).map_err(|e| export(entry, e))?;
        let mut running = Running { store, memory, alloc, process, aggregate, limits };
        if instance.get_export(&running.store, "rill_init").is_some() {
            let init = instance
                .get_typed_func::<(i32, i32), i32>(&running.store, "rill_init")
                .map_err(|e| export("rill_init", e))?;
            let (ptr, len) = running.write(&abi::encode_params(params))?;
            match init.call(&mut running.store, (ptr, len)).map_err(|e| call_error(&e, &limits))? {
                0 => {}
                code => {
                    let (lines, _) = running.take_logs();
                    let log = if lines.is_empty() { "it logged no reason".to_string() } else { lines.join("; ") };
                    return Err(FnError::Init { code, log });
                }
            }
        }
        Ok(running)
    }

    /// Copies `bytes` into the guest through its `rill_alloc`.
    fn write(&mut self, bytes: &[u8]) -> Result<(i32, i32), FnError> {
        self.store.set_fuel(self.limits.fuel_per_call).map_err(|e| FnError::Trap(e.to_string()))?;
        let len = i32::try_from(bytes.len()).map_err(|_| FnError::Memory(self.limits.memory_bytes))?;
        let ptr = self.alloc.call(&mut self.store, len).map_err(|e| call_error(&e, &self.limits))?;
        self.memory.write(&mut self.store, ptr as u32 as usize, bytes).map_err(|_| {
            FnError::Abi(format!("rill_alloc({len}) returned {ptr}, which is not room for {len} bytes"))
        })?;
        Ok((ptr, len))
    }

    /// Runs one batch: the guest's outputs (and an aggregate's changed states), or why it
    /// failed. `states` holds each key's state before the batch (an aggregate's; others
    /// ignore it); `topics` is the number of output topics the function has.
    pub(crate) fn process(
        &mut self,
        inputs: &[Input<'_>],
        states: &BTreeMap<StateKey, Vec<u8>>,
        topics: usize,
    ) -> Result<Ran, FnError> {
        let (batch, slots) = if self.aggregate {
            let (bytes, slots) = abi::encode_aggregate_batch(inputs, states);
            (bytes, Some(slots))
        } else {
            (abi::encode_batch(inputs), None)
        };
        let (ptr, len) = self.write(&batch)?;
        self.store.set_fuel(self.limits.fuel_per_call).map_err(|e| FnError::Trap(e.to_string()))?;
        let packed = self.process.call(&mut self.store, (ptr, len)).map_err(|e| call_error(&e, &self.limits))?;
        let (out_ptr, out_len) = ((packed as u64 >> 32) as usize, (packed as u64 & 0xffff_ffff) as usize);
        if out_len > self.limits.answer_bytes_max {
            return Err(FnError::AnswerTooLarge { len: out_len, max: self.limits.answer_bytes_max });
        }
        let mut answer = vec![0; out_len];
        self.memory.read(&self.store, out_ptr, &mut answer).map_err(|_| {
            FnError::Malformed(format!("its answer ({out_len} bytes at {out_ptr}) lies outside its memory"))
        })?;
        let slot_count = slots.as_ref().map(Vec::len);
        match abi::decode_answer(&answer, inputs.len(), topics, slot_count).map_err(FnError::Malformed)? {
            Answer::Outputs(outputs, changed) => {
                let slots = slots.unwrap_or_default();
                let states = changed.into_iter().map(|(slot, state)| (slots[slot as usize].clone(), state)).collect();
                Ok(Ran { outputs, states })
            }
            Answer::Failed(why) => Err(FnError::Failed(why)),
        }
    }

    /// The lines the guest logged since the last call, and how many more it tried to.
    pub(crate) fn take_logs(&mut self) -> (Vec<String>, u64) {
        let state = self.store.data_mut();
        (std::mem::take(&mut state.logs), std::mem::take(&mut state.logs_dropped))
    }
}

#[cfg(test)]
mod tests;
