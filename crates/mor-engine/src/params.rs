//! Named parameter tensors with their gradients, allocated once. Names follow Hugging Face
//! conventions (`model.layers.3.self_attn.q_proj.weight`) so import/export is a name table.

use crate::backend::Backend;

/// Which optimizer a tensor belongs to (the aux router has its own, MOR_SPEC 3.6b).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamGroup {
    Main,
    AuxRouter,
}

#[derive(Debug, Clone)]
pub struct ParamInfo {
    pub name: String,
    pub shape: Vec<usize>,
    /// Weight decay applies to matrices and embeddings, not to norm vectors.
    pub decay: bool,
    pub group: ParamGroup,
}

impl ParamInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Handle of one tensor in a [`ParamStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ParamId(pub usize);

pub struct ParamStore<B: Backend> {
    pub info: Vec<ParamInfo>,
    pub values: Vec<B::Buf>,
    pub grads: Vec<B::Buf>,
}

impl<B: Backend> ParamStore<B> {
    pub fn new() -> Self {
        ParamStore { info: Vec::new(), values: Vec::new(), grads: Vec::new() }
    }

    /// Register a tensor with initial values `init` (length = product of `shape`).
    pub fn add(&mut self, backend: &B, info: ParamInfo, init: &[f32]) -> ParamId {
        assert_eq!(init.len(), info.numel(), "init length of {}", info.name);
        assert!(self.find(&info.name).is_none(), "duplicate parameter {}", info.name);
        let n = info.numel();
        self.values.push(backend.from_f32(init));
        self.grads.push(backend.zeros(n));
        self.info.push(info);
        ParamId(self.info.len() - 1)
    }

    pub fn find(&self, name: &str) -> Option<ParamId> {
        self.info.iter().position(|i| i.name == name).map(ParamId)
    }

    pub fn len(&self) -> usize {
        self.info.len()
    }

    pub fn is_empty(&self) -> bool {
        self.info.is_empty()
    }

    pub fn ids(&self) -> impl Iterator<Item = ParamId> {
        (0..self.info.len()).map(ParamId)
    }

    pub fn value(&self, id: ParamId) -> &B::Buf {
        &self.values[id.0]
    }

    pub fn grad(&self, id: ParamId) -> &B::Buf {
        &self.grads[id.0]
    }

    /// The value of one tensor and the gradient of another (or the same) at once.
    pub fn value_and_grad_mut(&mut self, value: ParamId, grad: ParamId) -> (&B::Buf, &mut B::Buf) {
        (&self.values[value.0], &mut self.grads[grad.0])
    }

    /// Zero every gradient ([`Backend::fill_many`]: one launch on devices).
    pub fn zero_grads(&mut self, backend: &B) {
        let mut bufs: Vec<(&mut B::Buf, usize)> = self.grads.iter_mut().zip(&self.info).map(|(g, info)| (g, info.numel())).collect();
        backend.fill_many(&mut bufs, 0.0);
    }

    /// Number of scalars in tensors matching `pred`.
    pub fn count(&self, pred: impl Fn(&ParamInfo) -> bool) -> usize {
        self.info.iter().filter(|i| pred(i)).map(|i| i.numel()).sum()
    }
}

impl<B: Backend> Default for ParamStore<B> {
    fn default() -> Self {
        Self::new()
    }
}
