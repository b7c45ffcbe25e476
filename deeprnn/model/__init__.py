"""The model: L recurrent layers stacked, after d2l's "Deep Recurrent Neural Networks".

`config` holds ModelConfig and the one map of compute dtypes; `cells` writes the RNN, GRU and
LSTM cells from their equations; `stack` stacks them (the `scratch` implementation) or Flax's
own cells (`flax`); `fused` and its LSTM layer `fused_lstm` run the same parameters on a faster
schedule, with cuDNN's LSTM (`cudnn_lstm`) as the other layer kernel where `lstm_kernels` says
it wins; `build` picks the implementation and initialises it; `convert` maps parameters between
the scratch and Flax layouts; `generation` emits text in one compiled call. Nothing here knows
about files, flags or devices.
"""
