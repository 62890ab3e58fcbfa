//! Activation functions and their derivatives.

/// The activation fused into a batch-norm or squeeze-excitation kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    None,
    /// x·sigmoid(x), also called swish (EfficientNet V1/V2).
    Silu,
    /// min(max(x, 0), 6) (EfficientNet-Lite).
    Relu6,
}

/// 1/(1 + e^−x), vectorizable: [`crate::simd::sigmoid`].
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    crate::simd::sigmoid(x)
}

impl Act {
    #[inline(always)]
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Act::None => x,
            Act::Silu => crate::simd::silu(x),
            Act::Relu6 => x.clamp(0.0, 6.0),
        }
    }

    /// d act(x) / dx at `x` (PyTorch's convention at ReLU6's corners: 0).
    #[inline(always)]
    pub fn derivative(self, x: f32) -> f32 {
        match self {
            Act::None => 1.0,
            Act::Silu => {
                let s = sigmoid(x);
                s * (1.0 + x * (1.0 - s))
            }
            Act::Relu6 => {
                if x > 0.0 && x < 6.0 {
                    1.0
                } else {
                    0.0
                }
            }
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Act::None => "none",
            Act::Silu => "silu",
            Act::Relu6 => "relu6",
        }
    }
}

/// An activation as a type, so kernels can be monomorphized per activation and vectorize
/// (a runtime `match` inside an inner loop would block that). See [`with_activation!`].
pub trait Activation: Copy + Send + Sync {
    fn apply(x: f32) -> f32;
    fn derivative(x: f32) -> f32;
}

macro_rules! activation_type {
    ($name:ident, $variant:ident) => {
        #[derive(Debug, Clone, Copy)]
        pub struct $name;
        impl Activation for $name {
            #[inline(always)]
            fn apply(x: f32) -> f32 {
                Act::$variant.apply(x)
            }
            #[inline(always)]
            fn derivative(x: f32) -> f32 {
                Act::$variant.derivative(x)
            }
        }
    };
}
activation_type!(Identity, None);
activation_type!(SiluFn, Silu);
activation_type!(Relu6Fn, Relu6);

/// Runs `$body` with the type alias `$A` bound to the [`Activation`] type of `$act`.
#[macro_export]
macro_rules! with_activation {
    ($act:expr, $A:ident => $body:expr) => {
        match $act {
            $crate::act::Act::None => {
                type $A = $crate::act::Identity;
                $body
            }
            $crate::act::Act::Silu => {
                type $A = $crate::act::SiluFn;
                $body
            }
            $crate::act::Act::Relu6 => {
                type $A = $crate::act::Relu6Fn;
                $body
            }
        }
    };
}
