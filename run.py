"""Train a U-Net on the LGG MRI Segmentation data, evaluate it, predict with it
(the same as the `lggunet` console script; see lggunet/cli.py).

python run.py --config=configs/unet.py --config.data.manual_dir=PATH --workdir=runs/unet
python run.py --config=configs/demo.py --workdir=runs/demo     # synthetic phantom, no download
python run.py --config=configs/demo.py --workdir=runs/demo --mode=evaluate
python run.py --config=configs/demo.py --workdir=runs/demo --mode=predict --input=P --output=O
"""

from lggunet.cli import run

if __name__ == "__main__":
    run()
