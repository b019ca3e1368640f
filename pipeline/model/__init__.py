"""CLIP-ViP model code (layer 1: torch + transformers only; never ray, deepspeed or mlflow).

Import the submodules directly; this package stays import-light:

    from pipeline.model.clip_vip import CLIPViPModel, CLIPViPConfig, config_from_model_cfg
    from pipeline.model.checkpoints import load_clip_vip, save_official
"""
