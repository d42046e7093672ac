"""sfumato against diffusers on this machine (the same as ``sfumato bench``; see ``sfumato/bench.py``).

    python bench/bench.py [--quick] [--json out.json] [--only unet,vae,text,load,memory] [--sdxl]
"""

from sfumato.bench import main

if __name__ == "__main__":
    main()
