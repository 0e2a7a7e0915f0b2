//! Core errors to Python exceptions. The classes live in the pure-Python module
//! `libtunnel._errors` (so they can use multiple inheritance, e.g. `TunnelTimeout` is also a
//! `TimeoutError`); this file only passes the core's stable code name and message to its
//! `_from_native` factory. Nothing here looks at message text.

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;

/// `libtunnel._errors._from_native`, imported on first use.
static FACTORY: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// The Python exception for a core error: the class chosen by `err.code().name()`.
pub(crate) fn to_py(err: libtunnel::Error) -> PyErr {
    Python::attach(|py| {
        let made = FACTORY
            .get_or_try_init(py, || py.import("libtunnel._errors")?.getattr("_from_native").map(Bound::unbind))
            .and_then(|f| f.bind(py).call1((err.code().name(), err.message())));
        match made {
            Ok(exc) => PyErr::from_value(exc),
            Err(e) => e,
        }
    })
}
