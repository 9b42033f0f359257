//! Locks that outlive a panicking holder: the datapath's lock is shared by the API, the port
//! watcher and the buffer thread, and one panic must not take the others down with it (the
//! maps it guards are the kernel's, consistent at every single update). May call nothing else
//! of the product.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `m`, also when an earlier holder panicked.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
