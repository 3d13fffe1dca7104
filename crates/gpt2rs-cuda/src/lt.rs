//! Matrix products with their epilogue fused, through cuBLASLt: `x += h · wᵀ + bias` (a
//! projection back into the f32 residual stream), `act(h · wᵀ + bias)` in the model's
//! precision (the MLP's first layer), and a prompt's queries, keys and values straight into
//! q and its sequence's cache, for passes longer than the matrix-vector kernels take.
//! Plain cuBLAS would write an f32 product that an elementwise kernel then reads back.
//!
//! Plans (descriptors, layouts and the heuristic's algorithm) are made once per shape and
//! kept; a shape cuBLASLt has no algorithm for is remembered as such, and its products take
//! the unfused path.

use crate::device::device_err;
use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys::{
    cublasComputeType_t, cublasLtEpilogue_t, cublasLtHandle_t, cublasLtMatmulAlgo_t,
    cublasLtMatmulDescAttributes_t, cublasLtMatmulDesc_t, cublasLtMatmulPreferenceAttributes_t,
    cublasLtMatrixLayoutAttribute_t, cublasLtMatrixLayout_t, cudaDataType, cudaStream_t,
};
use gpt2rs::Result;
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;

/// What a fused product does after the multiplication.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Fused {
    /// `out` (f32) += product + bias.
    Residual,
    /// `out` (the activations' type) = gelu-tanh(product + bias).
    Gelu,
    /// `out` = relu(product + bias).
    Relu,
    /// `out` (f32) = alpha · product + bias: the queries, alpha the attention scale and the
    /// bias scaled by it.
    Query,
    /// Keys and values in one call: `out` (the activations' type) = product + bias for the
    /// first n rows of the matrix, and at `out + batch_stride` elements (an operand) for the
    /// next n, with the next n of the bias: a sequence's keys and values of one layer are
    /// that far apart in its cache.
    KeyValue,
}

/// One product's shape: `rows` rows of activations times an `n × k` matrix.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Shape {
    fused: Fused,
    rows: usize,
    n: usize,
    k: usize,
    half: bool,
}

/// A product's descriptor and its operands' layouts (C and D share one).
struct Descriptors {
    desc: cublasLtMatmulDesc_t,
    a: cublasLtMatrixLayout_t,
    b: cublasLtMatrixLayout_t,
    d: cublasLtMatrixLayout_t,
}

struct Plan {
    descs: Descriptors,
    algo: cublasLtMatmulAlgo_t,
    /// The bias is in the output's type (f16 / bf16), not f32: the activation epilogues'
    /// fallback when cuBLASLt has no algorithm for an f32 bias.
    half_bias: bool,
}

/// cuBLASLt for one GPU's stream, with its plans.
pub struct Lt {
    handle: cublasLtHandle_t,
    /// By shape; `None`: cuBLASLt has no algorithm for it.
    plans: RefCell<HashMap<Shape, Option<Plan>>>,
    workspace: (u64, usize),
}

// SAFETY: the handle and descriptors are only used from the thread that owns the engine
// (the engine is moved between threads, never shared).
unsafe impl Send for Lt {}

/// A fused product's operands: device addresses of the activations `x` (`[rows, k]`, f16 or
/// bf16), the matrix `w` (`[n, k]`, same type), the f32 bias, the same bias in the output's
/// type (0 when there is none), the output, the factor of the product (1 but for Query) and
/// the elements from the first output to the second (KeyValue only).
pub struct Operands {
    pub x: u64,
    pub w: u64,
    pub bias: u64,
    pub half_bias: u64,
    pub out: u64,
    pub alpha: f32,
    pub batch_stride: u64,
}

impl Lt {
    /// A handle whose products use `workspace` (address, bytes) as scratch.
    pub fn new(workspace: (u64, usize)) -> Result<Self> {
        let handle = lt::create_handle().map_err(device_err("starting cuBLASLt"))?;
        Ok(Self {
            handle,
            plans: RefCell::new(HashMap::new()),
            workspace,
        })
    }

    /// Makes the plan for a product ahead of its first pass (host work only: the heuristic
    /// query would otherwise land on the step that first has this many rows).
    pub fn prepare(&self, fused: Fused, rows: usize, n: usize, k: usize, half: bool) -> Result<()> {
        let shape = Shape {
            fused,
            rows,
            n,
            k,
            half,
        };
        if !self.plans.borrow().contains_key(&shape) {
            let plan = self.plan(shape)?;
            self.plans.borrow_mut().insert(shape, plan);
        }
        Ok(())
    }

    /// Enqueues `fused` for `rows` × (`n × k`) on `stream`, `half` meaning f16 (else bf16)
    /// operands; `Ok(false)` when cuBLASLt has no algorithm for it (nothing was enqueued).
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        stream: cudaStream_t,
        fused: Fused,
        rows: usize,
        n: usize,
        k: usize,
        half: bool,
        ops: &Operands,
    ) -> Result<bool> {
        let shape = Shape {
            fused,
            rows,
            n,
            k,
            half,
        };
        let mut plans = self.plans.borrow_mut();
        let plan = match plans.entry(shape) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(self.plan(shape)?),
        };
        let Some(plan) = plan.as_ref() else {
            return Ok(false);
        };
        let Descriptors { desc, a, b, d } = &plan.descs;
        let err = device_err("a cuBLASLt matmul");
        let bias = if plan.half_bias {
            ops.half_bias
        } else {
            ops.bias
        };
        if bias == 0 {
            return Ok(false);
        }
        // SAFETY: the descriptor is live; the attribute is a device pointer (8 bytes).
        unsafe {
            lt::set_matmul_desc_attribute(
                *desc,
                cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                &bias as *const u64 as *const c_void,
                8,
            )
        }
        .map_err(&err)?;
        if fused == Fused::KeyValue {
            let offset = ops.batch_stride as i64;
            // SAFETY: the layout is live; the attribute is an i64.
            unsafe {
                lt::set_matrix_layout_attribute(
                    *d,
                    cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                    &offset as *const i64 as *const c_void,
                    8,
                )
            }
            .map_err(&err)?;
        }
        let alpha = ops.alpha;
        let beta = if fused == Fused::Residual { 1f32 } else { 0f32 };
        // Column-major view, as in the engine's plain products: out (n × rows) = wᵀ' · x'.
        // C is D: the residual stream is read and written in place.
        // SAFETY: the layouts match the buffers' sizes, which the caller guarantees.
        unsafe {
            lt::matmul(
                self.handle,
                *desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                ops.w as *const c_void,
                *a,
                ops.x as *const c_void,
                *b,
                ops.out as *const c_void,
                *d,
                ops.out as *mut c_void,
                *d,
                &plan.algo,
                self.workspace.0 as *mut c_void,
                self.workspace.1,
                stream,
            )
        }
        .map_err(&err)?;
        Ok(true)
    }

    /// The plan for `s` with an f32 bias, else (activation epilogues) with a bias in the
    /// output's type; `None` when cuBLASLt has neither.
    fn plan(&self, s: Shape) -> Result<Option<Plan>> {
        if let Some(plan) = self.plan_with(s, false)? {
            return Ok(Some(plan));
        }
        match s.fused {
            Fused::Residual | Fused::Query => Ok(None),
            Fused::Gelu | Fused::Relu | Fused::KeyValue => self.plan_with(s, true),
        }
    }

    fn plan_with(&self, s: Shape, half_bias: bool) -> Result<Option<Plan>> {
        let err = device_err("planning a cuBLASLt matmul");
        let ty = if s.half {
            cudaDataType::CUDA_R_16F
        } else {
            cudaDataType::CUDA_R_16BF
        };
        let out_ty = match s.fused {
            Fused::Residual | Fused::Query => cudaDataType::CUDA_R_32F,
            Fused::Gelu | Fused::Relu | Fused::KeyValue => ty,
        };
        let epilogue = match s.fused {
            Fused::Residual | Fused::Query | Fused::KeyValue => {
                cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS
            }
            Fused::Gelu => cublasLtEpilogue_t::CUBLASLT_EPILOGUE_GELU_BIAS,
            Fused::Relu => cublasLtEpilogue_t::CUBLASLT_EPILOGUE_RELU_BIAS,
        };
        let (rows, n, k) = (s.rows as u64, s.n as u64, s.k as u64);
        let desc = lt::create_matmul_desc(
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cudaDataType::CUDA_R_32F,
        )
        .map_err(&err)?;
        let set = |attr, value: *const c_void, size: usize| {
            // SAFETY: `desc` is live and `value` points at `size` bytes of the attribute.
            unsafe { lt::set_matmul_desc_attribute(desc, attr, value, size) }.map_err(&err)
        };
        let transpose = cublasOperation_t::CUBLAS_OP_T;
        let bias_ty = if half_bias {
            ty
        } else {
            cudaDataType::CUDA_R_32F
        };
        set(
            cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
            &transpose as *const _ as *const c_void,
            std::mem::size_of_val(&transpose),
        )?;
        set(
            cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE,
            &epilogue as *const _ as *const c_void,
            std::mem::size_of_val(&epilogue),
        )?;
        set(
            cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE,
            &bias_ty as *const _ as *const c_void,
            std::mem::size_of_val(&bias_ty),
        )?;
        let descs = Descriptors {
            desc,
            a: lt::create_matrix_layout(ty, k, n, k as i64).map_err(&err)?,
            b: lt::create_matrix_layout(ty, k, rows, k as i64).map_err(&err)?,
            d: lt::create_matrix_layout(out_ty, n, rows, n as i64).map_err(&err)?,
        };
        if s.fused == Fused::KeyValue {
            // Two products a batch: the matrix's next n rows, the same activations (stride
            // 0), the bias's next n values, and the output further on (run sets how far; the
            // plan is made for outputs one after the other).
            let bias_stride = n as i64;
            set(
                cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE,
                &bias_stride as *const i64 as *const c_void,
                8,
            )?;
            for (layout, offset) in [
                (descs.a, (n * k) as i64),
                (descs.b, 0),
                (descs.d, (n * rows) as i64),
            ] {
                let count = 2i32;
                // SAFETY: the layout is live; the attributes are an i32 and an i64.
                unsafe {
                    lt::set_matrix_layout_attribute(
                        layout,
                        cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                        &count as *const i32 as *const c_void,
                        4,
                    )
                    .map_err(&err)?;
                    lt::set_matrix_layout_attribute(
                        layout,
                        cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                        &offset as *const i64 as *const c_void,
                        8,
                    )
                    .map_err(&err)?;
                }
            }
        }
        let pref = lt::create_matmul_pref().map_err(&err)?;
        let bytes = self.workspace.1 as u64;
        // SAFETY: `pref` is live; the attribute is a u64.
        unsafe {
            lt::set_matmul_pref_attribute(
                pref,
                cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &bytes as *const u64 as *const c_void,
                8,
            )
        }
        .map_err(&err)?;
        let Descriptors { desc, a, b, d } = &descs;
        // SAFETY: every descriptor is live.
        let found =
            unsafe { lt::get_matmul_algo_heuristic(self.handle, *desc, *a, *b, *d, *d, pref) };
        // SAFETY: `pref` is not used again.
        unsafe { lt::destroy_matmul_pref(pref) }.map_err(&err)?;
        Ok(found.ok().map(|h| Plan {
            descs,
            algo: h.algo,
            half_bias,
        }))
    }
}

impl Drop for Descriptors {
    fn drop(&mut self) {
        // SAFETY: each descriptor is destroyed once, after its last use.
        unsafe {
            let _ = lt::destroy_matrix_layout(self.a);
            let _ = lt::destroy_matrix_layout(self.b);
            let _ = lt::destroy_matrix_layout(self.d);
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

impl Drop for Lt {
    fn drop(&mut self) {
        self.plans.borrow_mut().clear();
        // SAFETY: the plans that used the handle are gone.
        unsafe {
            let _ = lt::destroy_handle(self.handle);
        }
    }
}
