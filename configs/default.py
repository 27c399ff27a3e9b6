"""The offline default: a small score model of the embedded 8x8 digits, on a laptop CPU.

Every config field of scorejax is defined here, once, with a comment; experiment files
(`configs/*.py`) start from `get_default_configs()` and override only what differs.
Field names follow score_sde's (`training.batch_size`, `model.num_scales`, ...), so its
command-line overrides carry over; fields new in scorejax sit beside them.

This file is itself a runnable config (scikit-learn's `load_digits`, no download):

  python main.py --workdir=runs/digits            # same as --config=configs/default.py
  python main.py --workdir=runs/digits --mode=sample
  python main.py --workdir=runs/digits --mode=eval

It trains a residual-MLP score model (the 8x8 images as 64-vectors; a U-Net is ~50x
slower per step on a CPU) with the VP SDE in continuous time for 8000 steps, about
10 minutes on 2 CPU cores, writing sample grids, a loss curve and bits/dim.
Try `--config.model.name=ncsnpp` for a small DDPM++ U-Net (needs hours on a CPU).
"""

import ml_collections


def get_default_configs() -> ml_collections.ConfigDict:
  """All fields with their defaults (the digits run); experiments override a few."""
  config = ml_collections.ConfigDict()
  config.seed = 42  # seeds parameters, data order, per-step noise and samples

  # Training (score_sde names).
  config.training = training = ml_collections.ConfigDict()
  training.sde = 'vpsde'  # 'vesde' | 'vpsde' | 'subvpsde' | 'cosinevpsde'
  training.continuous = True  # continuous-time DSM (False: SMLD / DDPM discrete losses)
  training.reduce_mean = True  # mean over pixels instead of sum in the per-example loss
  training.likelihood_weighting = False  # weight by g(t)^2 (Song et al. 2021b, NLL training)
  training.importance_weighting = False  # with it: t drawn from g^2 / std^2 (lower variance)
  training.class_dropout = 0.1  # class-conditional models (model.num_classes > 0): labels
  # dropped to "no class" with this probability (classifier-free guidance)
  training.eps = 1e-5  # smallest training time t ~ U[eps, T]
  # 'sde' (score_sde's losses) | 'edm' (Karras et al. 2022: noise levels sigma_t / alpha_t
  # ~ exp(N(p_mean, p_std^2)), denoising error weighted by (s^2 + sigma_data^2) / (s sigma_data)^2)
  training.objective = 'sde'
  training.p_mean = -1.2  # objective='edm': mean of the log noise level
  training.p_std = 1.2  # objective='edm': its standard deviation
  training.batch_size = 128  # global batch size (all devices / hosts)
  training.n_iters = 8000  # total optimizer steps
  training.n_jitted_steps = 1  # steps fused into one compiled call (lax.scan)
  training.grad_accum_steps = 1  # micro-batches per update (gradient accumulation): the same
  # update from batch_size / grad_accum_steps rows in memory at a time
  training.log_freq = 50  # steps between metric logs (a multiple of n_jitted_steps)
  training.eval_freq = 500  # steps between losses on a test batch
  training.snapshot_freq = 1000  # steps between kept checkpoints (and sample grids)
  training.snapshot_freq_for_preemption = 200  # steps between preemption checkpoints
  training.snapshot_sampling = True  # draw a sample grid at every snapshot
  training.max_to_keep = 0  # kept periodic checkpoints; 0 keeps all
  training.init_from = ''  # a run or converted checkpoint (workdir / step dir) whose params and
  # EMA start a new run (fine-tuning; fresh optimizer, step 0); ignored when resuming

  # Sampling (score_sde names; used by snapshots and --mode=sample).
  config.sampling = sampling = ml_collections.ConfigDict()
  # 'pc' (predictor-corrector) | 'ode' (probability flow) | 'fast' (DDIM, DPM-Solver(++))
  # | 'edm' (Karras et al. 2022: Heun in the noise level, optional stochastic churn)
  # | 'adaptive' (Jolicoeur-Martineau et al. 2021: reverse SDE, adaptive steps per sample)
  sampling.method = 'pc'
  sampling.predictor = 'euler_maruyama'  # see scorejax.sampling.PREDICTORS
  sampling.corrector = 'none'  # see scorejax.sampling.CORRECTORS
  sampling.snr = 0.16  # Langevin corrector signal-to-noise ratio
  sampling.n_steps_each = 1  # corrector steps per noise level
  sampling.noise_removal = True  # return the noise-free mean of the last step
  sampling.probability_flow = False  # PC predictor follows the probability-flow ODE
  # Time steps of the PC / fixed-step ODE / fast / edm grid; 0 = model.num_scales (fast: 20,
  # edm: 17 Heun steps, 35 NFE with noise_removal: the paper's CIFAR-10 setting).
  sampling.num_steps = 0
  sampling.eps = 1e-3  # final time of the reverse process
  sampling.ode_method = 'tsit5'  # see scorejax.sampling.ODE_METHODS
  sampling.fast_method = 'dpmpp_2m'  # method='fast': see scorejax.fast_solvers.FAST_METHODS
  sampling.time_grid = 'logsnr'  # method='fast': 'logsnr' | 'karras' | 'uniform' | 'quadratic'
  sampling.rho = 7.0  # method='edm': exponent of the Karras noise-level grid (1 = uniform)
  sampling.s_churn = 0.0  # method='edm': total churn (0 = deterministic Heun, EDM Alg. 1)
  sampling.s_tmin = 0.0  # method='edm': churn only at noise levels sigma_t / alpha_t >= s_tmin
  sampling.s_tmax = float('inf')  # method='edm': ... and <= s_tmax
  sampling.s_noise = 1.0  # method='edm': scale of the churn noise
  sampling.adaptive_rtol = 0.05  # method='adaptive': relative tolerance of the local error
  sampling.adaptive_atol = 0.0078  # method='adaptive': absolute tolerance, in data units
  sampling.rtol = 1e-5  # ODE relative tolerance
  sampling.atol = 1e-5  # ODE absolute tolerance
  sampling.batch_size = 64  # samples drawn per compiled call
  sampling.num_samples = 64  # samples written by --mode=sample (and per snapshot)
  sampling.condition = ''  # --mode=sample: '' | 'inpaint' | 'colorize' test images | 'class'
  # (class-conditional, with the classifier of --mode=train_classifier)
  sampling.mask = 'right_half'  # inpaint: 'right_half' | 'bottom_half' | 'center' | 'random'
  sampling.n_resample = 1  # condition: RePaint resampling rounds per step (NFE x n_resample)
  sampling.guidance = 0.0  # condition: reconstruction guidance weight (0 = off; corrector none)
  sampling.class_label = -1  # condition='class': the class drawn (-1: 0, 1, ..., K-1 in turn)
  sampling.classifier_scale = 1.0  # condition='class': guidance scale (1 = p(x | y))
  sampling.cfg_weight = 1.0  # condition='class', model.num_classes > 0: classifier-free
  # guidance weight w, (1 + w) s(x, t, y) - w s(x, t) (0 = the conditional model alone)
  sampling.classifier = ''  # condition='class': classifier dir ('' = <workdir>/classifier)
  sampling.checkpoint = ''  # sample/eval from this path ('' = the workdir's checkpoints)
  sampling.checkpoint_step = 0  # sample/eval this step (0 = the newest)
  sampling.use_ema = True  # sample with the EMA parameters

  # Evaluation (score_sde names; --mode=eval).
  config.eval = evaluate = ml_collections.ConfigDict()
  evaluate.batch_size = 128  # test-split batch size for the loss and bits/dim
  evaluate.enable_loss = True  # the training loss on the test split
  evaluate.enable_bpd = True  # bits/dim through the probability-flow ODE likelihood
  evaluate.enable_elbo = True  # the variational bound on bits/dim of the reverse-SDE model
  # (scorejax.elbo; same batches as bits/dim)
  evaluate.elbo_num_times = 32  # stratified times per example (one network forward each)
  evaluate.enable_sampling = True  # sample-quality metrics: digits-FID / IS (digits), FID /
  # IS / KID (images; needs inception_path and fid_stats_path), SWD / MMD / NLL (2-D toys)
  evaluate.num_samples = 512  # samples for the sample-quality metrics (50000 for papers)
  evaluate.inception_path = ''  # converted FID Inception weights (.npz, see
  # docs/evaluation.md); '' = env SCOREJAX_INCEPTION_PATH
  evaluate.fid_stats_path = ''  # reference statistics (.npz: mu/sigma or pool_3) of the
  # training set for FID / KID of image datasets (scripts/fid_stats.py)
  evaluate.bpd_dataset = 'test'  # split for bits/dim
  evaluate.bpd_num_batches = 2  # test batches for bits/dim (0 = the whole split)
  evaluate.bpd_num_repeats = 1  # repeats with fresh dequantization / Hutchinson noise
  evaluate.bpd_estimator = 'auto'  # divergence: 'exact' | 'rademacher' | 'gaussian' |
  # 'auto' (exact up to 16 dimensions, else rademacher)
  evaluate.loss_num_batches = 0  # test batches for the loss (0 = the whole split)
  evaluate.rtol = 1e-5  # likelihood ODE relative tolerance
  evaluate.atol = 1e-5  # likelihood ODE absolute tolerance
  evaluate.watch = False  # keep evaluating each new checkpoint until training ends
  evaluate.watch_timeout = 600  # seconds to wait for a new checkpoint when watching

  # Noise-conditional classifier p_t(y | x) for class-conditional sampling
  # (--mode=train_classifier writes <workdir>/classifier; scorejax.models.classifier).
  config.classifier = classifier = ml_collections.ConfigDict()
  classifier.channels = (32, 64, 128)  # ResNet stage widths (one 2x2 pooling between stages)
  classifier.num_res_blocks = 1  # residual blocks per stage
  classifier.embedding_dim = 64  # Fourier features of the noise level log(std / mean)
  classifier.fourier_scale = 1.0  # std of their frequencies
  classifier.n_iters = 4000  # training steps
  classifier.batch_size = 128
  classifier.lr = 1e-3  # Adam learning rate
  classifier.weight_decay = 0.0  # decoupled weight decay (AdamW) when > 0
  classifier.ema_rate = 0.999  # sampling uses the EMA parameters
  classifier.eps = 1e-5  # smallest training time
  classifier.log_freq = 100  # steps between logged losses
  classifier.snapshot_freq = 1000  # steps between checkpoints (a rerun resumes)
  classifier.eval_num_batches = 0  # test batches for the accuracy per noise level (0 = all)

  # Data (score_sde names).
  config.data = data = ml_collections.ConfigDict()
  data.dataset = 'digits'  # scorejax.datasets.DATASETS: digits, 2-D toys, cifar10, ...
  data.image_size = 8  # image side (ignored by 2-D toys)
  data.num_channels = 1  # image channels; for 2-D toys the data dimension
  data.centered = True  # data in [-1, 1] instead of [0, 1]
  data.random_flip = False  # horizontal flips (not for digits)
  data.uniform_dequantization = True  # add U[0, 1) noise to pixel levels (17 for digits): a
  # continuous density, so bits/dim of dequantized test data is meaningful
  data.data_dir = ''  # tfds data_dir or image folder ('' = tfds default)

  # Model (score_sde names; read by scorejax.models.make_model).
  config.model = model = ml_collections.ConfigDict()
  model.name = 'mlp'  # scorejax.models.MODELS: 'mlp', 'ddpm', 'ncsnpp', ...
  model.ema_rate = 0.999  # decay of the parameter EMA
  model.num_scales = 1000  # N: discrete noise levels / sampling steps
  model.sigma_min = 0.01  # VE smallest noise
  model.sigma_max = 50.0  # VE largest noise
  model.beta_min = 0.1  # VP / sub-VP beta(0)
  model.beta_max = 20.0  # VP / sub-VP beta(1)
  model.cosine_s = 0.008  # cosine VP (training.sde='cosinevpsde'): iDDPM's offset s
  model.logsnr_min = -10.0  # cosine VP: log(alpha^2 / sigma^2) at T (-10: as the linear VP)
  model.dropout = 0.0  # dropout rate in the residual blocks
  model.scale_by_sigma = False  # divide the output by sigma (VE)
  # '' (the network's output is score_sde's) | 'edm' (Karras et al. 2022: the network is F in
  # D = c_skip y + c_out F(c_in y), y = x / alpha_t; continuous time only)
  model.preconditioning = ''
  model.sigma_data = 0.5  # preconditioning / objective='edm': the data's standard deviation
  model.normalization = 'GroupNorm'
  model.nonlinearity = 'swish'
  model.nf = 32  # base channel count
  model.ch_mult = (1, 2)  # channel multiplier per resolution
  model.num_res_blocks = 2  # residual blocks per resolution
  model.attn_resolutions = (4,)  # resolutions with self-attention
  model.resamp_with_conv = True
  model.conditional = True  # condition on the noise level
  model.num_classes = 0  # > 0: class-conditional network (labelled data; classifier-free
  # guidance with sampling.condition=class)
  model.fir = False
  model.fir_kernel = (1, 3, 3, 1)
  model.skip_rescale = True
  model.resblock_type = 'biggan'  # NCSN++: 'biggan' | 'ddpm'
  model.progressive = 'none'
  model.progressive_input = 'none'
  model.progressive_combine = 'sum'
  model.attention_type = 'ddpm'
  model.init_scale = 0.0
  model.embedding_type = 'positional'  # 'positional' (VP) | 'fourier' (VE)
  model.fourier_scale = 16.0
  model.conv_size = 3
  model.hidden = 256  # MLP width ('mlp' only)
  model.num_layers = 4  # MLP residual blocks ('mlp' only)
  model.embedding_dim = 64  # MLP time-embedding width ('mlp' only)

  # Optimization (score_sde names).
  config.optim = optim = ml_collections.ConfigDict()
  optim.optimizer = 'Adam'  # 'Adam' | 'AdamW'
  optim.lr = 1e-3  # peak learning rate
  optim.beta1 = 0.9
  optim.eps = 1e-8
  optim.warmup = 200  # linear warm-up steps
  optim.grad_clip = 1.0  # global-norm clipping (negative: off)
  optim.weight_decay = 0.0  # AdamW only
  return config


def get_config() -> ml_collections.ConfigDict:
  return get_default_configs()
