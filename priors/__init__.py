"""Domain priors (arXiv 2603.01725, Sec. 3): a description of every clean training image and its text embedding, which
training aligns the domain prompt representation with (L_align). The embedded default describes images from their
records and measured statistics (``describe``), embeds with all-MiniLM-L6-v2 (``encoders``) and runs as a Ray Data job
(``job``, ``jobs/describe.py``); on a cluster a vision-language model on vLLM describes them (``vlm``,
``describer=vllm``) and CLIP's text tower can embed them (``encoder.name=clip``)."""
