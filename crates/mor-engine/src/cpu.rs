//! CPU reference backend (placeholder: being implemented).
use std::marker::PhantomData;
pub struct Cpu<T> { _t: PhantomData<T> }
